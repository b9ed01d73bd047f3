"""Tracking against a real `mlflow server` (SQLite backend, proxied artifacts) that the test starts,
kills in mid-run and starts again: training goes on, and what it logged during the outage arrives."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spanqa.train.tracking import RUN_ID_FILE, UNLOGGED_FILE, make_tracker

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
START_TIMEOUT_S = 180  # ~12 s on an idle machine, ~40 s when the two cores are shared with other jobs

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group (it forks uvicorn workers), stopped by that pid."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # The job runner (huey consumers) is for server-side jobs; the test needs only tracking.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server process owns it
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT_S} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: an outage, not a clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def log_tail(self) -> str:
        text = (self.root / "server.log").read_text(errors="replace")
        return text[-2000:]


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    """One server for the module (starting one costs 10-40 s); stopped by pid whatever happens."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(running_server):
    if running_server.process is None:  # the first start, or a test that failed with it down
        running_server.start()
    return running_server


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps_logged(train_log: Path) -> int:
    return train_log.read_text().count('"kind": "train"') if train_log.is_file() else 0


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "train.log").read_text(errors="replace")


@contextlib.contextmanager
def stopped(process: subprocess.Popen):
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def test_training_logs_to_a_server_that_goes_away_and_comes_back(server, tmp_path):
    from spanqa.testing import tiny_bert_dir

    model = tiny_bert_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    fixture = FIXTURES / "squad_v2_tiny.json"
    command = [
        sys.executable, "-m", "spanqa.cli", "train",
        "--train_file", str(fixture), "--dev_file", str(fixture), "--model", str(model),
        "--output_dir", str(out), "--max_seq_length", "128", "--doc_overlap", "32",
        "--max_query_length", "32",
        "--train_batch_size", "4", "--num_train_epochs", "2", "--max_steps", "30", "--logging_steps", "1",
        "--tag", "server-train", "--run_name", "tiny-span",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "train.log", "wb") as log:
        training = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The run exists on the server: freeze training, take the server down, let training go on.
            wait_for(lambda: (out / RUN_ID_FILE).is_file(), 300, "the MLflow run", training, poll=0.02)
            with stopped(training):
                server.kill()
            wait_for(lambda: "training continues" in log_text(tmp_path), 120, "the outage warning", training)
            wait_for(
                lambda: steps_logged(out / "train_log.jsonl") >= 2, 300, "steps in the outage", training, 0.02
            )
            # Training has run through the outage; hold it while the server comes back.
            with stopped(training):
                server.start()
            assert training.wait(timeout=300) == 0, log_text(tmp_path)[-3000:]
        finally:
            if training.poll() is None:
                training.kill()
    output = log_text(tmp_path)
    assert output.count("training continues") == 1, output[-3000:]
    assert "answers again" in output
    assert not (out / UNLOGGED_FILE).exists(), output[-3000:]

    mlflow_client = client(server.uri)
    run_id = (out / RUN_ID_FILE).read_text().strip()
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-span"
    assert run.data.tags["spanqa.tag"] == "server-train"
    assert run.data.params["config.head"] == "span"
    assert run.data.params["world_size"] == "1"
    losses = mlflow_client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 31)), "steps logged during the outage arrived"
    assert [m.step for m in mlflow_client.get_metric_history(run_id, "f1")] == [
        21
    ]  # 87 windows // 4: epoch 1
    artifacts = {a.path for a in mlflow_client.list_artifacts(run_id)}
    assert {"training_curves.png", "ds_config.json", "eval"} <= artifacts
    assert {a.path for a in mlflow_client.list_artifacts(run_id, "eval")} >= {"eval/eval_report.json"}
    check_predict_matches_training_eval(out, fixture)


# Runs last: it leaves the server down (a restart costs 10-40 s; the test above already shows one).
def test_tracker_keeps_going_when_the_server_dies(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    out = tmp_path / "out"
    tracker = make_tracker(0, out, run_name="outage", tags={"spanqa.tag": "server-test"})
    tracker.log_params({"config": {"head": "span", "lr": 3e-5}})
    tracker.log_metrics({"loss": 1.0}, step=1)
    (out / "report.json").write_text("{}")
    tracker.log_artifact(out / "report.json", "eval")
    assert tracker.flush()  # all of it sent (the artifact too: the sender is a thread) before the outage

    server.kill()
    tracker.retry_interval_s = 0.0  # try the dead server on every flush: each try must fail fast
    with caplog.at_level(logging.WARNING, logger="spanqa.train.tracking"):
        for step in range(2, 6):  # training goes on; nothing raises
            tracker.log_metrics({"loss": float(step)}, step=step)
            assert not tracker.flush()
        tracker.close()
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1

    unlogged = [json.loads(line) for line in (out / UNLOGGED_FILE).read_text().splitlines()]
    assert unlogged[0]["run_id"] == tracker.run_id
    assert [r["step"] for r in unlogged if r["kind"] == "metrics"] == [2, 3, 4, 5]
    assert unlogged[-1] == {"kind": "status", "status": "FINISHED"}
    # What was sent before the outage is in the server's store.
    backend = client(f"sqlite:///{server.root / 'mlflow.db'}")
    run = backend.get_run(tracker.run_id)
    assert run.data.params["config.head"] == "span"
    assert [m.step for m in backend.get_metric_history(tracker.run_id, "loss")] == [1]
    assert [p.name for p in (server.root / "artifacts").rglob("report.json")] == ["report.json"]


def check_predict_matches_training_eval(out: Path, dev_file: Path) -> None:
    """`spanqa predict` on the exported best model answers the dev file as the trainer's evaluation did
    (the run's only evaluation, so eval/ holds the best model's predictions)."""
    from spanqa.export import load_export
    from spanqa.predict import predict, read_questions

    model, tokenizer, settings = load_export(out / "best_model")
    got = predict(model, tokenizer, read_questions(dev_file), settings, batch_size=16)
    trainer_answers = json.loads((out / "eval" / "predictions.json").read_text())
    trainer_odds = json.loads((out / "eval" / "null_odds.json").read_text())
    assert {qid: p.answer for qid, p in got.items()} == trainer_answers
    for qid, p in got.items():
        assert p.null_odds == pytest.approx(trainer_odds[qid], abs=1e-4)
