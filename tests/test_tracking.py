"""The MLflow tracker on a local SQLite store: what it logs reads back through MlflowClient."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spanqa.train.plots import loss_points, moving_average, plot_training_curves, score_points
from spanqa.train.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    RUN_ID_FILE,
    UNLOGGED_FILE,
    NullTracker,
    Tracker,
    flatten_params,
    make_tracker,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    # One SQLite store for the module: creating its tables costs seconds, experiments keep tests apart.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking_env(monkeypatch, store_uri, request) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{request.node.name}")
    return store_uri


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_flatten_params_nests_with_dots_and_truncates():
    flat = flatten_params(
        {"model": {"head": "crf", "encoder": {"layers": 2}}, "lr": 3e-5, "long": "x" * 9000}
    )
    assert flat["model.head"] == "crf"
    assert flat["model.encoder.layers"] == "2"
    assert flat["lr"] == "3e-05"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH


def test_params_metrics_tags_artifacts_read_back(tracking_env, tmp_path):
    out = tmp_path / "out"
    tracker = make_tracker(0, out, run_name="unit", tags={"spanqa.tag": "cmp1"})
    assert isinstance(tracker, Tracker)
    tracker.log_params({"head": "span", "optim": {"lr": 3e-5, "betas": [0.9, 0.999]}})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 5.0 / step, "lr": 1e-5 * step}, step=step)
    tracker.log_metrics({"exact": 61.5, "f1": 64.25}, step=5)
    report = out / "eval_report.json"
    report.write_text(json.dumps({"exact": 61.5}))
    tracker.log_artifact(report, artifact_path="eval")
    tracker.close()

    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert run_id == tracker.run_id
    mlflow_client = client(tracking_env)
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unit"
    assert run.data.params["head"] == "span"
    assert run.data.params["optim.lr"] == "3e-05"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]"
    assert run.data.tags["spanqa.tag"] == "cmp1"
    # MLflow 3's UI opens an experiment of this kind on its training runs (not on "GenAI traces")
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = mlflow_client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 5.0 / s) for s in range(1, 6)]
    assert run.data.metrics["f1"] == 64.25
    artifacts = [a.path for a in mlflow_client.list_artifacts(run_id, "eval")]
    assert artifacts == ["eval/eval_report.json"]
    assert not (out / UNLOGGED_FILE).exists()


def test_resume_reuses_the_run_id_and_keeps_first_params(tracking_env, tmp_path, caplog):
    out = tmp_path / "out"
    first = make_tracker(0, out)
    first.log_params({"seed": 1, "max_steps": 10})
    first.log_metrics({"loss": 2.0}, step=1)
    first.close(status="KILLED")

    second = make_tracker(0, out)
    assert second.run_id == first.run_id
    assert client(tracking_env).get_run(second.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="spanqa.train.tracking"):
        second.log_params({"seed": 1, "max_steps": 20, "resumed_from": "ckpt-1"})
        assert second.flush()  # the sender thread has sent (and warned)
    assert "max_steps" in caplog.text
    second.log_metrics({"loss": 1.0}, step=2)
    second.close()

    mlflow_client = client(tracking_env)
    run = mlflow_client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_steps"] == "10"
    assert run.data.params["resumed_from"] == "ckpt-1"
    assert [m.value for m in mlflow_client.get_metric_history(first.run_id, "loss")] == [2.0, 1.0]
    experiment = mlflow_client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    assert len(mlflow_client.search_runs([experiment.experiment_id])) == 1


def test_unknown_stored_run_id_starts_a_new_run(tracking_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    tracker = make_tracker(0, out)
    tracker.close()
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert (out / RUN_ID_FILE).read_text().strip() == tracker.run_id


def test_default_store_is_sqlite_in_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(0, "out")
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.close()
    assert (tmp_path / "mlflow.db").is_file()
    run = client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 1.5}
    experiment = client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(run.info.experiment_id)
    assert experiment.name == "spanqa"


def test_nonzero_rank_writes_nothing_and_never_imports_mlflow(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from spanqa.train.tracking import make_tracker
        tracker = make_tracker(1, "out", run_name="r", tags={"spanqa.tag": "t"})
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact("missing.txt")
        tracker.close()
        print(type(tracker).__name__, tracker.run_id, "mlflow" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NullTracker", "None", "False"]
    assert list(tmp_path.iterdir()) == []


def test_null_tracker_has_the_tracker_api():
    public = {name for name in dir(Tracker) if not name.startswith("_") and callable(getattr(Tracker, name))}
    assert public <= set(dir(NullTracker))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_never_stops_training_and_records_what_was_not_logged(
    monkeypatch, tmp_path, caplog
):
    # Nothing listens on this port: every call fails at once with "connection refused".
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="spanqa.train.tracking"):
        tracker = make_tracker(0, out, tags={"spanqa.tag": "offline"})
        tracker.log_params({"head": "crf"})
        for step in range(1, 4):
            tracker.log_metrics({"loss": float(step)}, step=step)
            tracker.flush()
        tracker.close()
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, caplog.text
    assert tracker.run_id is None
    lines = [json.loads(line) for line in (out / UNLOGGED_FILE).read_text().splitlines()]
    assert lines[0]["kind"] == "run"
    kinds = [line["kind"] for line in lines[1:]]
    assert kinds == ["params", "metrics", "metrics", "metrics", "status"]
    assert [line["metrics"]["loss"] for line in lines[1:] if line["kind"] == "metrics"] == [1.0, 2.0, 3.0]
    assert str(out / UNLOGGED_FILE) in caplog.text


def test_training_curves_png(tmp_path):
    history = [{"step": s, "loss": 4.0 / s} for s in range(1, 201)]
    history += [
        {"epoch": e, "exact": 40.0 + 5 * e, "f1": 44.0 + 5 * e, "HasAns_f1": 30.0 + e} for e in (1, 2, 3)
    ]
    png = plot_training_curves(history, tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = plot_training_curves([], tmp_path / "empty.png")
    assert empty.is_file() and empty.read_bytes() != png.read_bytes()
    assert [p.name for p in tmp_path.rglob("*.tmp*")] == []


def test_curve_points_are_sorted_and_smoothed():
    history = [{"step": 2, "loss": 1.0}, {"epoch": 1.0, "f1": 50.0}, {"step": 1, "loss": 3.0}]
    assert loss_points(history) == ([1.0, 2.0], [3.0, 1.0])
    assert score_points(history, "f1") == ([1.0], [50.0])
    assert score_points(history, "exact") == ([], [])
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_a_process_that_dies_without_close_still_sends_and_marks_the_run_failed(tmp_path, store_uri):
    script = textwrap.dedent(
        """
        from spanqa.train.tracking import make_tracker
        tracker = make_tracker(0, "out")
        tracker.log_metrics({"loss": 0.5}, step=7)  # buffered: the flush interval has not passed
        raise SystemExit("trainer crashed")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store_uri}
    env["MLFLOW_EXPERIMENT_NAME"] = "test-crash"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 1 and "trainer crashed" in result.stderr
    run_id = (tmp_path / "out" / RUN_ID_FILE).read_text().strip()
    run = client(store_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 0.5}


def test_a_resumed_run_is_backfilled_from_train_log_and_logs_no_point_twice(tracking_env, tmp_path):
    """MLflow holds steps 1-5 (the rest was lost with a killed rank 0); the run log holds 1-8. After the
    backfill MLflow holds 1-8 once each, and steps 6-8 logged again live (re-run after the resume) are
    not sent a second time."""
    out = tmp_path / "out"
    first = make_tracker(0, out)
    for step in range(1, 6):
        first.log_metrics({"loss": 10.0 - step}, step=step)
    first.close(status="KILLED")
    history = [{"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, 9)]
    second = make_tracker(0, out)
    second.backfill(history)
    for step in range(6, 10):
        second.log_metrics({"loss": 10.0 - step}, step=step)
    second.close()
    points = client(tracking_env).get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in points) == list(range(1, 10))
    assert {m.step: m.value for m in points} == {s: 10.0 - s for s in range(1, 10)}


def test_unsent_records_are_kept_and_sent_first_by_the_next_start(monkeypatch, tmp_path, store_uri):
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-unlogged-replay")
    for attempt in (1, 2):  # two attempts without a server: the second must not lose the first's points
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        offline = make_tracker(0, out)
        offline.log_metrics({"loss": float(attempt)}, step=attempt)
        offline.close(status="KILLED")
    lines = [json.loads(line) for line in (out / UNLOGGED_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "metrics"] == [1, 2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)  # the server is back
    online = make_tracker(0, out)
    online.log_metrics({"loss": 3.0}, step=3)
    online.close()
    assert not (out / UNLOGGED_FILE).exists()
    run_id = (out / RUN_ID_FILE).read_text().strip()
    history = client(store_uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client(store_uri).get_run(run_id).info.status == "FINISHED"


def test_a_hung_server_never_holds_up_the_caller(monkeypatch, tmp_path):
    """A server that accepts connections and never answers, with a 10-minute HTTP timeout: logging
    returns at once (a blocked call would hang this test), and close() gives up at its deadline with
    every record on disk."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    threading.Thread(
        target=lambda: [accepted.append(listener.accept()) for _ in range(16)], daemon=True
    ).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "out"
    from spanqa.train import tracking

    monkeypatch.setattr(tracking.MlflowSender, "start", lambda self: None)  # the start would hang too
    tracker = make_tracker(0, out)
    for step in range(1, 201):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.close(deadline_s=2.0)
    lines = [json.loads(line) for line in (out / UNLOGGED_FILE).read_text().splitlines()]
    assert sorted(line["step"] for line in lines if line["kind"] == "metrics") == list(range(1, 201))
    assert lines[-1] == {"kind": "status", "status": "FINISHED"}
    listener.close()
