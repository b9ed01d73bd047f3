"""Training on MRQA data: `deepspeed --num_gpus 2 launcher/train.py --train_file X.jsonl.gz --dev_file
Y.jsonl.gz` with both heads, on the bundled SQuAD sample converted to MRQA (`spanqa convert --to mrqa`),
two CPU ranks (gloo) and the tiny random BERT. The run never predicts "no answer", is scored by the MRQA
metric (the same figures `spanqa evaluate` gives its files) and keeps its best model by F1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from runs import deepspeed_command, run

from spanqa.cli import main as cli

pytestmark = pytest.mark.slow


def train_two_ranks(model: Path, data: dict[str, Path], out: Path, head: str) -> subprocess.CompletedProcess:
    flags = [
        "--model", str(model), "--head", head,
        "--train_file", str(data["train"]), "--dev_file", str(data["dev"]),
        "--output_dir", str(out / "run"), "--cache_dir", str(out / "cache"),
        "--max_seq_length", "128", "--doc_overlap", "32", "--max_query_length", "32",
        "--train_batch_size", "16", "--num_train_epochs", "0.2", "--eval_per_epoch", "1",
        "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "5", "--seed", "3",
    ]  # fmt: skip
    return run(deepspeed_command(flags), out / "mlflow.db", timeout=900)


@pytest.mark.parametrize("head", ["span", "crf"])
def test_two_ranks_train_and_evaluate_on_mrqa_files(head, mrqa_sample, tiny_model, tmp_path, capsys):
    train_two_ranks(tiny_model, mrqa_sample, tmp_path, head)
    trained = tmp_path / "run"
    report = json.loads((trained / "eval" / "eval_report.json").read_text())
    assert report["metric"] == "mrqa" and report["total"] == 261  # the dev sample's answerable questions
    assert not {"HasAns_f1", "NoAns_f1", "best_f1"} & report.keys()  # no unanswerable questions, no sweep
    predictions = json.loads((trained / "eval" / "predictions.json").read_text())
    assert len(predictions) == 261 and all(predictions.values())  # version_2_with_negative is off
    # the best model was picked by F1 (--eval_metric best_f1 means f1 on MRQA) and answers like it trained
    exported = json.loads((trained / "best_model" / "spanqa_config.json").read_text())
    assert exported["answers"]["version_2_with_negative"] is False
    assert exported["metric"]["value"] == pytest.approx(report["f1"])
    # the official MRQA figures of the same files, through `spanqa evaluate`
    assert (
        cli(
            [
                "evaluate",
                "--data_file",
                str(mrqa_sample["dev"]),
                "--predictions",
                str(trained / "eval" / "predictions.json"),
            ]
        )
        == 0
    )
    official = json.loads(capsys.readouterr().out)
    assert (official["exact"], official["f1"]) == (report["exact"], report["f1"])

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert logged.data.params["config.answers.version_2_with_negative"] == "false"
    assert logged.data.params["world_size"] == "2" and logged.data.params["config.head"] == head
    assert logged.data.metrics["f1"] == pytest.approx(report["f1"])
    meta = json.loads(next((tmp_path / "cache").glob("dev.jsonl-*/meta.json")).read_text())
    assert meta["source"]["format"] == "mrqa" and meta["validation"]["questions"] == 261
