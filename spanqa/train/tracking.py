"""MLflow tracking for a training job: one run, written by rank 0 only, that survives resumes and outages.

Rank 0 gets a `Tracker`; every other rank gets a `NullTracker`, so the trainer calls the same methods on
every rank and only rank 0 ever imports mlflow (torchtitan's no-op logger, torchtune's lazy import).

The store is `MLFLOW_TRACKING_URI` (default: `sqlite:///mlflow.db` in the working directory, what
`mlflow ui` opens) and the experiment `MLFLOW_EXPERIMENT_NAME` (default "spanqa"). The run id is kept in
`OUTPUT_DIR/mlflow_run_id`, so a resumed or requeued job logs into the same run.

A tracking server that goes away must never stop or stall training: the tracker only puts records on a
bounded queue (past it, straight onto the sender's backlog), and a background thread
(spanqa.train.mlflow_sender) sends them with short HTTP timeouts; `close()` waits for it up to a deadline,
and what it could not send goes to OUTPUT_DIR/mlflow_unlogged.jsonl for the next start to send.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spanqa.train.mlflow_sender import RUN_ID_FILE, UNLOGGED_FILE, MlflowSender, one_line

__all__ = [
    "RUN_ID_FILE",
    "UNLOGGED_FILE",
    "NullTracker",
    "Tracker",
    "flatten_params",
    "make_tracker",
    "one_line",
]

log = logging.getLogger(__name__)  # under "spanqa.train": the trainer's rank-prefixed handler

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "spanqa"
MAX_QUEUED = 10_000  # records waiting for the sender; past this they go to the unlogged file
CLOSE_DEADLINE_S = 60.0  # how long close() waits for the sender before writing what is left to disk

# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would keep one call going for
# minutes while the server is down. These bound one call to a few seconds; a value the user has set in
# the environment wins. Names checked against mlflow 3.17's mlflow/environment_variables.py.
BOUNDED_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# MLflow's limits (mlflow/utils/validation.py): longer values are rejected, not truncated.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250


class NullTracker:
    """What ranks other than 0 get: every method does nothing (and mlflow is never imported)."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def backfill(self, history: list[dict]) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, status: str = "FINISHED") -> None:
        pass


def make_tracker(
    rank: int, output_dir: str | os.PathLike, run_name: str | None = None, tags: dict | None = None
) -> Tracker | NullTracker:
    """The tracker for this process: a real MLflow run on rank 0, a no-op everywhere else."""
    if rank != 0:
        return NullTracker()
    return Tracker(output_dir, run_name=run_name, tags=tags)


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (and dataclasses) as {"a.b.c": "value"}, values cut to MLflow's length limit."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name[:MAX_KEY_LENGTH]] = _as_text(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _as_float(value: Any) -> float | None:
    """A metric value as a float, or None for what is not a number (skipped rather than crashing)."""
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """Short HTTP timeouts and retries for the MLflow calls made inside (unless the user set them)."""
    added = [name for name in BOUNDED_HTTP_ENV if name not in os.environ]
    for name in added:
        os.environ[name] = BOUNDED_HTTP_ENV[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class Tracker:
    """One MLflow run, written from rank 0 by a background thread. Never raises into, nor waits in, the
    training loop."""

    def __init__(self, output_dir: str | os.PathLike, run_name: str | None = None, tags: dict | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        tags = {str(k): _as_text(v) for k, v in (tags or {}).items()}
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table migrations etc.: not for people
        # MLflow reads the timeouts when it first sends: set for the life of the process, as spanqa's
        # only MLflow client is this thread's.
        for name, value in BOUNDED_HTTP_ENV.items():
            os.environ.setdefault(name, value)
        self._sender = MlflowSender(self.output_dir, self.tracking_uri, experiment, run_name, tags)
        self._sender.start()  # at most a few seconds, before any step, when the server does not answer
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self._stop = object()
        self._closed = False
        self._thread = threading.Thread(
            target=self._sender.serve, args=(self._queue, self._stop), daemon=True
        )
        self._thread.start()
        atexit.register(self._close_at_exit)

    @property
    def run_id(self) -> str | None:
        """The run's id (None until the sender has created the run, or while the server is away)."""
        return self._sender.run_id

    # -- public API ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as params; on a resumed run, keys already logged are not re-sent."""
        flat = flatten_params(params)
        if flat:
            self._put({"kind": "params", "params": flat})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {str(k): _as_float(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            self._put(
                {
                    "kind": "metrics",
                    "step": int(step),
                    "timestamp": int(time.time() * 1000),
                    "metrics": values,
                }
            )

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a directory (the path is kept, not a copy: it is read when sent)."""
        path = Path(path)
        if not path.exists():
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        self._put({"kind": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def backfill(self, history: list[dict]) -> None:
        """A resumed run's train_log.jsonl records: MLflow gets the points it lacks, and no point twice."""
        self._put({"kind": "backfill", "history": list(history)})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait (up to `timeout`) until the sender has tried to send everything queued; for tests and
        the end of a run, never the training loop."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout) and not self._sender.pending

    def close(self, status: str = "FINISHED", deadline_s: float = CLOSE_DEADLINE_S) -> None:
        """End the run with `status` once what is queued is sent; after `deadline_s` (a hung server)
        whatever is left goes to OUTPUT_DIR/mlflow_unlogged.jsonl."""
        if self._closed:
            return
        self._closed = True
        self._put({"kind": "status", "status": status})
        self._queue.put(self._stop)
        self._thread.join(deadline_s)
        if self._thread.is_alive():
            log.warning("MLflow at %s did not answer within %.0f s", self.tracking_uri, deadline_s)
            self._abandon()

    # -- internals ----------------------------------------------------------------------------------
    def _put(self, record: dict) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:  # the sender is far behind (a long outage): add to its backlog, never wait
            with self._sender.lock:
                self._sender.pending.append(record)

    def _abandon(self) -> None:
        """The sender is stuck in a call: take what it has not sent, and what is still queued, to disk."""
        self._sender.abandoned = True
        queued = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                queued.append(item)
        with self._sender.lock:
            self._sender.pending.extend(queued)
        self._sender.write_unlogged()

    def _close_at_exit(self) -> None:
        # A process that ends without close() (an exception in the trainer) still sends what it has,
        # and the run says it failed instead of staying "RUNNING" forever.
        if not self._closed:
            self.close(status="FAILED", deadline_s=10.0)
