"""The best model as an MLflow model: logged once to the training run, registered, loaded back with
`mlflow.pyfunc.load_model` and served by `mlflow models serve`, answering exactly like `spanqa predict`;
and MLflow system metrics on rank 0.

The slow tests share one real training run (one process, the tiny BERT, the tiny SQuAD v2 fixture,
a real SQLite MLflow store). Its null threshold is raised so that the model answers most questions:
comparing empty answers would prove little.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spanqa.errors import SpanqaError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
BIN = Path(sys.executable).parent
REGISTERED = "spanqa-tiny"


def fixture_questions(count: int = 12) -> list[dict]:
    data = json.loads(FIXTURE.read_text())
    rows = [
        {"id": qa["id"], "question": qa["question"], "context": paragraph["context"]}
        for article in data["data"]
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    return rows[:count]


def spanqa_predict(model_dir: Path, rows: list[dict], tmp: Path) -> dict:
    """`spanqa predict --input` on `rows`, the real command line: its --details records by id."""
    questions = tmp / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    details = tmp / "details.json"
    done = subprocess.run(
        [sys.executable, "-m", "spanqa.cli", "predict", "--model", str(model_dir), "--input", str(questions)]
        + ["--output", str(tmp / "predictions.json"), "--details", str(details), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(details.read_text())


def assert_same_answers(records: list[dict], expected: dict, rows: list[dict]) -> None:
    assert len(records) == len(rows)
    for row, got in zip(rows, records, strict=True):
        want = expected[row["id"]]
        assert got["answer"] == want["answer"], row["id"]
        for key in ("score", "null_odds"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (row["id"], key)


# ------------------------------------------------------------------------------------- fast: the parts


def test_frame_rows_become_questions_with_ids_by_position_when_missing():
    import pandas as pd

    from spanqa.train.mlflow_model import questions_from_frame

    frame = pd.DataFrame(
        [{"id": "a", "question": "Q1?", "context": "C1."}, {"question": "Q2?", "context": "C2."}]
    )
    assert [(q.id, q.question, q.context) for q in questions_from_frame(frame)] == [
        ("a", "Q1?", "C1."),
        ("1", "Q2?", "C2."),
    ]
    with pytest.raises(SpanqaError, match=r"model input: \[1\]\.context: empty"):
        questions_from_frame(pd.DataFrame({"question": ["Q?", "Q?"], "context": ["C.", " "]}))
    with pytest.raises(SpanqaError, match="duplicate question id 'x'"):
        questions_from_frame(pd.DataFrame({"id": ["x", "x"], "question": ["Q?"] * 2, "context": ["C."] * 2}))


def test_nothing_is_logged_without_a_run_or_an_export(tmp_path):
    from spanqa.train.mlflow_model import log_best_model
    from spanqa.train.system_metrics import start_system_metrics
    from spanqa.train.tracking import NullTracker

    assert log_best_model(NullTracker(), tmp_path / "best_model", "name") is None
    assert not start_system_metrics(NullTracker(), enabled=True).running  # ranks other than 0


def test_register_model_needs_an_evaluation_and_a_name(tmp_path):
    from spanqa.config import parse_train_args

    base = ["--model", "m", "--train_file", str(FIXTURE), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SpanqaError, match="--register_model: needs an evaluation"):
        parse_train_args([*base, "--register_model", "qa"])
    with pytest.raises(SpanqaError, match="--register_model: empty name"):
        parse_train_args([*base, "--dev_file", str(FIXTURE), "--register_model", " "])
    config = parse_train_args([*base, "--dev_file", str(FIXTURE), "--register_model", "qa"])
    assert config.register_model == "qa" and config.system_metrics
    assert not parse_train_args([*base, "--no-system_metrics"]).system_metrics


@pytest.mark.slow
def test_system_metrics_sample_into_the_run_until_stopped(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from spanqa.train.system_metrics import start_system_metrics
    from spanqa.train.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(tmp_path / "out")
    assert not start_system_metrics(tracker, enabled=False).running
    sampler = start_system_metrics(tracker, enabled=True)
    assert sampler.running
    client = MlflowClient(tracker.tracking_uri)
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and len(client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")) < 2
    ):
        time.sleep(0.2)
    sampler.stop()
    tracker.close()
    history = client.get_metric_history(tracker.run_id, "system/system_memory_usage_megabytes")
    assert len(history) >= 2 and all(m.value > 0 for m in history)
    assert [m.step for m in history] == list(range(len(history)))


# ------------------------------------------------------------------- slow: after a real training run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(output dir, tracking URI, run id) of a finished training run with --register_model."""
    from spanqa.testing import tiny_bert_dir

    work = tmp_path_factory.mktemp("mlflow-model")
    model = tiny_bert_dir(work / "tiny-bert")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a run of seconds still gets samples
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = work / "out"
    flags = [
        "--model", str(model), "--train_file", str(FIXTURE), "--dev_file", str(FIXTURE),
        "--output_dir", str(out), "--cache_dir", str(work / "cache"),
        "--max_seq_length", "128", "--doc_overlap", "32", "--max_query_length", "32",
        "--train_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "2", "--seed", "7", "--null_score_diff_threshold", "3",
        "--register_model", REGISTERED,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "train.py"), *flags],
        env=env, cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    assert f"registered as {REGISTERED} version 1" in done.stderr
    return out, uri, (out / "mlflow_run_id").read_text().strip()


@pytest.mark.slow
def test_the_run_holds_the_model_once_registered_with_a_signature_and_system_metrics(trained_run):
    import mlflow
    from mlflow import MlflowClient

    out, uri, run_id = trained_run
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.run_id == run_id and info.flavors.keys() >= {"python_function"}
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["question", "context", "id"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["answer", "score", "null_odds"]
    assert info.saved_input_example_info is not None
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    assert str(version.version) == "1" and version.run_id == run_id
    # the weights once in the whole store: inside the logged model, not among the run's artifacts
    store_root = Path(uri.removeprefix("sqlite:///")).parent
    weights = sorted(store_root.rglob("mlruns/**/model.safetensors"))
    assert len(weights) == 1 and "/models/" in str(weights[0]), weights
    assert (out / "best_model" / "model.safetensors").read_bytes() == weights[0].read_bytes()
    assert run.data.metrics["system/cpu_utilization_percentage"] >= 0
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.slow
def test_the_pyfunc_answers_like_spanqa_predict(trained_run, tmp_path):
    import mlflow
    import pandas as pd

    out, uri, run_id = trained_run
    rows = fixture_questions()
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    frame = model.predict(pd.DataFrame(rows))
    assert list(frame.columns) == ["answer", "score", "null_odds"]
    expected = spanqa_predict(out / "best_model", rows, tmp_path)
    assert sum(1 for p in expected.values() if p["answer"]) >= len(rows) // 2  # most questions answered
    assert_same_answers(frame.to_dict("records"), expected, rows)
    without_ids = model.predict(pd.DataFrame(rows).drop(columns="id"))
    assert without_ids.to_dict("records") == frame.to_dict("records")


@pytest.mark.slow
def test_the_served_model_answers_like_spanqa_predict(trained_run, tmp_path):
    """`mlflow models serve --env-manager local`, a real server on a free port, stopped here."""
    out, uri, run_id = trained_run
    port, rows = free_port(), fixture_questions(6)
    # the server execs `uvicorn` by name: this venv's bin first on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"runs:/{run_id}/model",
        "--env-manager",
        "local",
    ]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"),
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        body = json.dumps({"dataframe_records": rows}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        stop_server(server)
    assert_same_answers(served, spanqa_predict(out / "best_model", rows, tmp_path), rows)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it started uvicorn workers), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return  # already gone (it died before answering)
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout_s:.0f} s: {log.read_text()[-3000:]}")
