"""The code of the MLflow model that training logs (MLflow's "models from code": the model is this file
plus the export as its artifact, nothing pickled). MLflow runs it when it loads the model."""

import mlflow.models

from spanqa.train.mlflow_model import SpanqaQAModel

mlflow.models.set_model(SpanqaQAModel())
