"""MLflow tracking for a training job: one run, written by rank 0 only, that survives resumes and outages.

Rank 0 gets a `Tracker`; every other rank gets a `NullTracker`, so the trainer calls the same methods on
every rank and only rank 0 ever imports mlflow (torchtitan's no-op logger, torchtune's lazy import).

The store is `MLFLOW_TRACKING_URI` (default: `sqlite:///mlflow.db` in the working directory, what
`mlflow ui` opens) and the experiment `MLFLOW_EXPERIMENT_NAME` (default "spanqa"). The run id is kept in
`OUTPUT_DIR/mlflow_run_id`, so a resumed or requeued job logs into the same run.

A tracking server that goes away must never stop or stall training: every MLflow call runs with short
HTTP timeouts and few retries; the first failure is reported once, everything after it is buffered in
memory and re-sent (in order) when the server answers again; what is still unsent at `close()` is
written to `OUTPUT_DIR/mlflow_unlogged.jsonl` so that nothing is lost silently.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spanqa import io

log = logging.getLogger(__name__)  # under "spanqa.train": the trainer's rank-prefixed handler

RUN_ID_FILE = "mlflow_run_id"
UNLOGGED_FILE = "mlflow_unlogged.jsonl"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "spanqa"

# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) block a training step for
# minutes when the server is down. These bound one call to a few seconds; a value the user has set in
# the environment wins. Names checked against mlflow 3.17's mlflow/environment_variables.py.
# One immediate retry (a keep-alive connection the server just closed is not an outage); a failed call
# then puts the tracker offline and its records are re-sent later, which is the real retry. A server
# host that vanished (no answer at all) costs two timeouts per attempt, attempts spaced out exponentially.
BOUNDED_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# MLflow's limits (mlflow/utils/validation.py): longer values are rejected, not truncated.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100


class NullTracker:
    """What ranks other than 0 get: every method does nothing (and mlflow is never imported)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> bool:
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


class _ClientError(Exception):
    """MLflow refused a record (bad value, changed param): re-sending it cannot help, so it is dropped."""


class Tracker:
    """One MLflow run, written from rank 0. Never raises into the training loop."""

    retry_interval_s: float = 30.0  # wait after a first failure before trying the server again ...
    max_retry_interval_s: float = 600.0  # ... doubled after each further failure, up to this
    flush_interval_s: float = 5.0  # metrics are sent in batches at most this often (and at close)

    def __init__(
        self, output_dir: str | os.PathLike, run_name: str | None = None, tags: dict | None = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.run_name = run_name
        self.run_id: str | None = self._stored_run_id()
        self._initial_tags = {str(k): _as_text(v) for k, v in (tags or {}).items()}
        self._pending: list[dict] = []  # records not yet accepted by MLflow, oldest first
        self._logged_params: dict[str, str] | None = None
        self._run_ready = False  # the run exists (or was re-opened) in the store
        self._offline_since: float | None = None
        self._wait_s = self.retry_interval_s
        self._last_flush = time.monotonic()
        self._closed = False

        with bounded_http():
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._try(self._start_run)
        atexit.register(self._close_at_exit)

    # -- public API ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as params; on a resumed run, keys already logged are not re-sent."""
        flat = flatten_params(params)
        if flat:
            self._pending.append({"kind": "params", "params": flat})
            self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics at a global step; they are sent in batches (see flush_interval_s)."""
        timestamp = int(time.time() * 1000)
        values = {str(k): _as_float(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return
        record = {"kind": "metrics", "step": int(step), "timestamp": timestamp, "metrics": values}
        self._pending.append(record)
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a directory now (or when the server is back: the path is kept, not a copy)."""
        path = Path(path)
        if not path.exists():
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        record = {"kind": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path}
        self._pending.append(record)
        self.flush()

    def flush(self) -> bool:
        """Send everything pending; True when nothing is left. Cheap while the server is known down."""
        self._last_flush = time.monotonic()
        if not self._pending and self._run_ready:
            return True
        if self._offline_since is not None and time.monotonic() - self._offline_since < self._wait_s:
            return False
        return self._try(self._send_pending)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is pending, end the run with `status`; what MLflow never took goes to a JSONL file."""
        if self._closed:
            return
        self._closed = True
        # One last attempt whatever the retry interval says (_try itself never waits).
        self._pending.append({"kind": "status", "status": status})
        self._try(self._send_pending)
        if self._pending:
            self._write_unlogged()

    # -- internals ----------------------------------------------------------------------------------
    def _stored_run_id(self) -> str | None:
        path = self.output_dir / RUN_ID_FILE
        if path.is_file():
            return path.read_text().strip() or None
        return None

    def _try(self, action) -> bool:
        """Run an MLflow action; on an unreachable server, warn once and go offline instead of raising."""
        try:
            with bounded_http():
                action()
        except Exception as err:  # noqa: BLE001 - a tracking failure must never end a training job
            if self._offline_since is None:
                log.warning(
                    "MLflow tracking at %s failed (%s); training continues, records are kept and "
                    "re-sent when it answers again (next try in %.0f s)",
                    self.tracking_uri,
                    one_line(err),
                    self.retry_interval_s,
                )
                self._wait_s = self.retry_interval_s
            else:
                self._wait_s = min(2 * self._wait_s, self.max_retry_interval_s)
            self._offline_since = time.monotonic()
            return False
        if self._offline_since is not None:
            log.warning("MLflow tracking at %s answers again; caught up", self.tracking_uri)
        self._offline_since = None
        return True

    def _start_run(self) -> None:
        if self.run_id is not None:
            self._reopen_run()
            if self.run_id is not None:
                self._run_ready = True
                return
        from mlflow.tracking.context.registry import resolve_tags

        experiment_id = self._experiment_id()
        tags = resolve_tags(self._initial_tags)
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        io.write_text(self.output_dir / RUN_ID_FILE, self.run_id + "\n")
        self._run_ready = True
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment_name, self.tracking_uri)

    def _reopen_run(self) -> None:
        """Resume the stored run: mark it running again, remember its params (they cannot change)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(self.run_id)
        except MlflowException as err:
            if _http_status(err) not in (400, 404):
                raise
            log.warning(
                "MLflow run %s from %s is not in %s; starting a new run",
                self.run_id,
                self.output_dir / RUN_ID_FILE,
                self.tracking_uri,
            )
            self.run_id = None
            return
        self._logged_params = dict(run.data.params)
        self._client.update_run(self.run_id, status="RUNNING")
        if self._initial_tags:
            self._pending.insert(0, {"kind": "tags", "tags": dict(self._initial_tags)})
        log.info("MLflow run %s resumed", self.run_id)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self.experiment_name)
        except MlflowException:
            # Another job created it between our lookup and our create.
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _send_pending(self) -> None:
        if not self._run_ready:
            self._start_run()
        while self._pending:
            count = self._batch_size()
            try:
                self._send(self._pending[:count])
            except _ClientError as err:
                log.warning("MLflow rejected %s (%s); dropped", self._pending[0]["kind"], err)
            del self._pending[:count]

    def _batch_size(self) -> int:
        """How many pending records go in one request: consecutive metric records, up to MLflow's cap."""
        if self._pending[0]["kind"] != "metrics":
            return 1
        count, total = 0, 0
        for record in self._pending:
            if record["kind"] != "metrics" or total + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
                break
            count, total = count + 1, total + len(record["metrics"])
        return max(count, 1)

    def _send(self, records: list[dict]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            kind = records[0]["kind"]
            if kind == "metrics":
                self._send_metrics(records)
            elif kind == "params":
                self._send_params(records[0]["params"])
            elif kind == "tags":
                self._send_tags(records[0]["tags"])
            elif kind == "artifact":
                self._send_artifact(records[0])
            elif kind == "status":
                self._client.set_terminated(self.run_id, status=records[0]["status"])
        except MlflowException as err:
            if _http_status(err) in (400, 404, 409, 413, 422):
                raise _ClientError(one_line(err)) from err
            raise

    def _send_metrics(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, record["timestamp"], record["step"])
            for record in records
            for key, value in record["metrics"].items()
        ]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def _send_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self._logged_params is not None:
            params = self._drop_known_params(params)
        items = list(params.items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
            if self._logged_params is not None:
                self._logged_params.update(chunk)

    def _drop_known_params(self, params: dict[str, str]) -> dict[str, str]:
        """MLflow params are write-once: skip those already logged, warn about those that changed."""
        known = self._logged_params or {}
        changed = sorted(k for k, v in params.items() if k in known and known[k] != v)
        if changed:
            log.warning(
                "MLflow run %s already has params %s with other values; MLflow keeps the first ones",
                self.run_id,
                ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
            )
        return {k: v for k, v in params.items() if k not in known}

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = list(tags.items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in chunk])

    def _send_artifact(self, record: dict) -> None:
        path = Path(record["path"])
        if not path.exists():
            raise _ClientError(f"{path} no longer exists")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), record["artifact_path"])
        else:
            self._client.log_artifact(self.run_id, str(path), record["artifact_path"])

    def _write_unlogged(self) -> None:
        path = self.output_dir / UNLOGGED_FILE
        header = {
            "kind": "run",
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment_name,
        }
        lines = [json.dumps(header)] + [json.dumps(record, default=str) for record in self._pending]
        io.write_text(path, "\n".join(lines) + "\n")
        count = len(self._pending)
        log.warning("MLflow at %s did not take %d records; wrote them to %s", self.tracking_uri, count, path)

    def _close_at_exit(self) -> None:
        # A process that ends without close() (an exception in the trainer) still sends what it has,
        # and the run says it failed instead of staying "RUNNING" forever.
        if not self._closed:
            self.close(status="FAILED")


def _http_status(err: Exception) -> int | None:
    getter = getattr(err, "get_http_status_code", None)
    try:
        return int(getter()) if getter else None
    except (TypeError, ValueError):
        return None


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
