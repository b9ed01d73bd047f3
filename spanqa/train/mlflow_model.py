"""The best model as an MLflow model: a `pyfunc` around spanqa's own predictor, logged to the training run.

    log_best_model(tracker, OUTPUT_DIR / "best_model", register_as)    # rank 0, at the end of training
    mlflow.pyfunc.load_model("runs:/<run id>/model").predict(frame)    # anywhere spanqa is installed
    mlflow models serve -m runs:/<run id>/model --env-manager local

Input: a frame with columns `question`, `context` and optionally `id`; output: `answer`, `score`,
`null_odds` per row, in input order, exactly what `spanqa predict` gives for the same questions (same
windows, same null threshold: those of the export's spanqa_config.json).

The export directory is the model's one artifact: MLflow copies it into the logged model once, and
nothing else logs the weights. The model's code is spanqa/train/mlflow_pyfunc.py (MLflow's models from
code: nothing is pickled), so loading the model needs spanqa importable (it is one of the model's pip
requirements). Only rank 0 imports this module (and so mlflow), at the end of training.
"""

from __future__ import annotations

import logging
import math
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from spanqa import io

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # runs:/<run id>/model
ARTIFACT_KEY = "best_model"
INPUT_EXAMPLE = {
    "id": ["example"],
    "question": ["Who wrote Emma?"],
    "context": ["Emma is a novel by Jane Austen, first published in 1815."],
}
# What loading the model needs, pinned to the versions that trained it.
REQUIREMENTS = ("spanqa", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "mlflow")


def questions_from_frame(frame: pd.DataFrame) -> list:
    """The rows of `frame` as spanqa Questions (a missing id is the row number); SpanqaError naming the
    row and column of a bad one."""
    from spanqa.predict import questions_from_records

    records = []
    for record in frame.to_dict("records"):
        qid = record.get("id")
        if qid is None or (isinstance(qid, float) and math.isnan(qid)):
            record.pop("id", None)  # optional, per row
        records.append(record)
    return questions_from_records(records, "model input")


def predictions_frame(questions: list, predictions: dict) -> pd.DataFrame:
    """answer, score, null_odds per question, in the order of `questions` (NaN where spanqa has None)."""
    rows = [predictions[q.id] for q in questions]
    return pd.DataFrame(
        {
            "answer": [p.answer for p in rows],
            "score": [_nan_for_none(p.score) for p in rows],
            "null_odds": [_nan_for_none(p.null_odds) for p in rows],
        }
    )


def _nan_for_none(value: float | None) -> float:
    return math.nan if value is None else value


class SpanqaQAModel(mlflow.pyfunc.PythonModel):
    """spanqa's predictor over the export in the artifact `best_model` (either head)."""

    def load_context(self, context) -> None:
        from spanqa.export import load_export

        self.model, self.tokenizer, self.info = load_export(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from spanqa.predict import predict

        questions = questions_from_frame(model_input)
        answers = predict(self.model, self.tokenizer, questions, self.info)
        return predictions_frame(questions, answers)


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.string, "question"),
            ColSpec(DataType.string, "context"),
            ColSpec(DataType.string, "id", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(DataType.string, "answer"),
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.double, "null_odds"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_best_model(tracker: Any, best_dir: Path, register_as: str | None = None) -> str | None:
    """Log `best_dir` (an export) to the tracker's run as the MLflow model `model` and, with
    `register_as`, register it in the Model Registry. Returns the model URI, or None when there was
    nothing to log or MLflow failed (a warning says which: training's results stand either way)."""
    run_id = getattr(tracker, "run_id", None)
    if run_id is None or not (Path(best_dir) / "spanqa_config.json").is_file():
        if register_as:
            log.warning("no best model (no evaluation ran, or no MLflow run): nothing to register")
        return None
    try:
        return _log(tracker.tracking_uri, run_id, Path(best_dir), register_as)
    except Exception as err:  # noqa: BLE001 - the model is on disk; a tracking failure must not fail the job
        log.warning("MLflow: could not log the best model (%s); it is in %s", io.first_line(err), best_dir)
        return None


def _log(tracking_uri: str, run_id: str, best_dir: Path, register_as: str | None) -> str:
    from mlflow.models import Model

    from spanqa.export import read_export_info

    # Model.log finds the store and the experiment of the model in MLflow's global state (the model
    # would land in the Default experiment otherwise); this process is ending.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    step = read_export_info(best_dir).step or 0
    info = Model.log(
        artifact_path=None,  # positional in Model.log; `name` replaces it in MLflow 3
        name=MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        step=step,  # the logged model carries the run's metrics at the step it is from
        python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
        artifacts={ARTIFACT_KEY: str(best_dir)},
        signature=signature(),
        input_example=pd.DataFrame(INPUT_EXAMPLE),
        pip_requirements=requirements(),
        registered_model_name=register_as,
    )
    where = f"runs:/{run_id}/{MODEL_NAME}"
    registered = info.registered_model_version
    log.info(
        "MLflow model %s (from step %d)%s",
        where,
        step,
        f", registered as {register_as} version {registered}" if register_as else "",
    )
    return where
