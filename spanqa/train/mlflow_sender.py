"""The thread that talks to MLflow for rank 0's tracker (spanqa.train.tracking): it alone owns the
MlflowClient, so that a slow or absent tracking server never stalls a training step.

It takes records off the tracker's queue and sends them in batches. When the server fails it warns once,
keeps the records and tries again later (backing off); what it could not send by the end is written to
OUTPUT_DIR/mlflow_unlogged.jsonl, and the next start of the run sends that file first. A resumed run
`backfill`s MLflow from train_log.jsonl (the truth): every point past the last one MLflow holds for its
key goes out, and live points MLflow already holds (steps re-run after a crash) are not sent twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from spanqa import io

log = logging.getLogger("spanqa.train.tracking")

RUN_ID_FILE = "mlflow_run_id"
UNLOGGED_FILE = "mlflow_unlogged.jsonl"
# Tells the MLflow 3 UI that the experiment's runs are model training (its experimentKind tag), so
# that it opens on the runs instead of its GenAI traces page.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")

# MLflow's limits (mlflow/utils/validation.py): longer values are rejected, not truncated.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100


class ClientError(Exception):
    """MLflow refused a record (bad value, changed param): re-sending it cannot help, so it is dropped."""


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def http_status(err: Exception) -> int | None:
    getter = getattr(err, "get_http_status_code", None)
    try:
        return int(getter()) if getter else None
    except (TypeError, ValueError):
        return None


class MlflowSender:
    retry_interval_s: float = 30.0  # wait after a first failure before trying the server again ...
    max_retry_interval_s: float = 600.0  # ... doubled after each further failure, up to this
    flush_interval_s: float = 5.0  # metrics go out in batches at most this often

    def __init__(
        self, output_dir: Path, tracking_uri: str, experiment: str, run_name: str | None, tags: dict
    ):
        self.output_dir, self.tracking_uri, self.experiment_name = output_dir, tracking_uri, experiment
        self.run_name, self.initial_tags = run_name, tags
        path = output_dir / RUN_ID_FILE
        self.run_id: str | None = (path.read_text().strip() or None) if path.is_file() else None
        self.pending: list[dict] = []  # records not yet accepted by MLflow, oldest first
        self.lock = threading.Lock()  # pending and the unlogged file are shared with the main thread
        self.abandoned = False
        self._client = None
        self._run_ready = False
        self._logged_params: dict[str, str] | None = None
        self._last_step: dict[str, int] = {}  # per metric key, the last step MLflow holds (after a backfill)
        self._offline_since: float | None = None
        self._wait_s = self.retry_interval_s

    # ---- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """In the caller's thread, before training: the client, the run (created or reopened) and what an
        earlier attempt left unsent. MLflow registers exit handlers on first use, which must not happen
        as late as the interpreter's own exit."""
        with self.lock:
            self.pending[:0] = self._read_unlogged()
        self.send_all(final=True)

    def serve(self, queue, stop) -> None:
        """Take records off `queue` until `stop` (an object put last) arrives; then one last send and the
        unlogged file for what is left."""
        from queue import Empty

        last_send = time.monotonic()
        while not self.abandoned:
            try:
                item = queue.get(timeout=self.flush_interval_s)
            except Empty:
                item = None
            if item is stop:
                self.send_all(final=True)
                self.write_unlogged()
                return
            if isinstance(item, threading.Event):  # a flush request: send now, then say so
                self.send_all(final=False)
                item.set()
                continue
            if item is not None:
                with self.lock:
                    self.pending.append(item)
            due = time.monotonic() - last_send >= self.flush_interval_s or (
                item and item["kind"] != "metrics"
            )
            if due:
                self.send_all(final=False)
                last_send = time.monotonic()

    def send_all(self, final: bool) -> bool:
        """Send everything pending (unless the server is known down and it is not time to retry);
        True when nothing is left."""
        waiting = self._offline_since is not None and time.monotonic() - self._offline_since < self._wait_s
        if waiting and not final:
            return False
        try:
            self._send_pending()
        except Exception as err:  # noqa: BLE001 - a tracking failure must never end a training job
            self._went_offline(err)
            return False
        if self._offline_since is not None:
            log.warning("MLflow tracking at %s answers again; caught up", self.tracking_uri)
        self._offline_since = None
        return True

    def _went_offline(self, err: Exception) -> None:
        if self._offline_since is None:
            log.warning(
                "MLflow tracking at %s failed (%s); training continues, records are kept and re-sent when it "
                "answers again (next try in %.0f s)",
                self.tracking_uri,
                one_line(err),
                self.retry_interval_s,
            )
            self._wait_s = self.retry_interval_s
        else:
            self._wait_s = min(2 * self._wait_s, self.max_retry_interval_s)
        self._offline_since = time.monotonic()

    # ---- the unlogged file --------------------------------------------------------------------

    def _read_unlogged(self) -> list[dict]:
        path = self.output_dir / UNLOGGED_FILE
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and record.get("kind") not in (None, "run"):
                records.append(record)
        if records:
            log.warning(
                "MLflow: %d records an earlier attempt could not send (%s) go first", len(records), path
            )
        return records

    def write_unlogged(self) -> None:
        """What MLflow has not taken, in order, to OUTPUT_DIR/mlflow_unlogged.jsonl (replacing what an
        earlier attempt left there: its records were read into `pending` at the start)."""
        path = self.output_dir / UNLOGGED_FILE
        with self.lock:
            records = list(self.pending)
        if not records:
            path.unlink(missing_ok=True)
            return
        header = {"kind": "run", "run_id": self.run_id, "tracking_uri": self.tracking_uri}
        lines = [json.dumps(header), *(json.dumps(record, default=str) for record in records)]
        io.write_text(path, "\n".join(lines) + "\n")
        log.warning(
            "MLflow at %s did not take %d records; wrote them to %s", self.tracking_uri, len(records), path
        )

    # ---- the run ------------------------------------------------------------------------------

    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _start_run(self) -> None:
        if self.run_id is not None:
            self._reopen_run()
            if self.run_id is not None:
                self._run_ready = True
                return
        from mlflow.tracking.context.registry import resolve_tags

        run = self.client().create_run(
            self._experiment_id(), run_name=self.run_name, tags=resolve_tags(self.initial_tags)
        )
        self.run_id = run.info.run_id
        io.write_text(self.output_dir / RUN_ID_FILE, self.run_id + "\n")
        self._run_ready = True
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment_name, self.tracking_uri)

    def _reopen_run(self) -> None:
        """Resume the stored run: mark it running again, remember its params (they cannot change)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client().get_run(self.run_id)
        except MlflowException as err:
            if http_status(err) not in (400, 404):
                raise
            log.warning("MLflow run %s is not in %s; starting a new run", self.run_id, self.tracking_uri)
            self.run_id = None
            return
        self._logged_params = dict(run.data.params)
        self.client().update_run(self.run_id, status="RUNNING")
        if self.initial_tags:
            self.pending.insert(0, {"kind": "tags", "tags": dict(self.initial_tags)})
        log.info("MLflow run %s resumed", self.run_id)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.experiment_name, tags=dict([EXPERIMENT_KIND_TAG])
                )
            except MlflowException:  # another job created it between our lookup and our create
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if experiment is not None:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG[0] not in experiment.tags:
                client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND_TAG)
        return experiment_id

    # ---- sending ------------------------------------------------------------------------------

    def _send_pending(self) -> None:
        if not self._run_ready:
            self._start_run()
        while not self.abandoned:
            with self.lock:
                if not self.pending:
                    return
                batch = next_batch(self.pending)
            try:
                self._send(batch)
            except ClientError as err:
                log.warning("MLflow rejected %s (%s); dropped", batch[0]["kind"], err)
            with self.lock:
                del self.pending[: len(batch)]

    def _send(self, records: list[dict]) -> None:
        from mlflow.exceptions import MlflowException

        kind, client = records[0]["kind"], self.client()
        try:
            if kind == "metrics":
                self._send_metrics(records)
            elif kind == "params":
                self._send_params(records[0]["params"])
            elif kind == "tags":
                for chunk in chunks(list(records[0]["tags"].items()), MAX_PARAMS_TAGS_PER_BATCH):
                    client.log_batch(self.run_id, tags=[_tag(k, v) for k, v in chunk])
            elif kind == "artifact":
                self._send_artifact(records[0])
            elif kind == "backfill":
                self._backfill(records[0]["history"])
            elif kind == "status":
                client.set_terminated(self.run_id, status=records[0]["status"])
        except MlflowException as err:
            if http_status(err) in (400, 404, 409, 413, 422):
                raise ClientError(one_line(err)) from err
            raise

    def _send_metrics(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, record["timestamp"], record["step"])
            for record in records
            for key, value in record["metrics"].items()
            if record["step"] > self._last_step.get(key, -1)  # MLflow has it already (a re-run step)
        ]
        for chunk in chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client().log_batch(self.run_id, metrics=chunk)

    def _backfill(self, history: list[dict]) -> None:
        """Send the points of `history` (train_log.jsonl's records) that MLflow does not hold yet, and
        remember per key the last step it holds, so that live points are not sent twice."""
        from mlflow.entities import Metric

        keys = sorted({k for entry in history for k in entry if k not in ("kind", "step")})
        for key in keys:
            steps = [m.step for m in self.client().get_metric_history(self.run_id, key)]
            self._last_step[key] = max(steps, default=-1)
        now = int(time.time() * 1000)
        missing = [
            Metric(key, float(value), now, int(entry["step"]))
            for entry in history
            for key, value in entry.items()
            if key not in ("kind", "step")
            and isinstance(value, int | float)
            and entry["step"] > self._last_step[key]
        ]
        for chunk in chunks(missing, MAX_METRICS_PER_BATCH):
            self.client().log_batch(self.run_id, metrics=chunk)
        if missing:
            log.warning("MLflow: sent %d points of train_log.jsonl that the run did not have", len(missing))
        for entry in history:
            for key in entry:
                if key not in ("kind", "step"):
                    self._last_step[key] = max(self._last_step.get(key, -1), int(entry["step"]))

    def _send_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self._logged_params is not None:
            params = self._drop_known_params(params)
        for chunk in chunks(list(params.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client().log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
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

    def _send_artifact(self, record: dict) -> None:
        path = Path(record["path"])
        if not path.exists():
            raise ClientError(f"{path} no longer exists")
        if path.is_dir():
            self.client().log_artifacts(self.run_id, str(path), record["artifact_path"])
        else:
            self.client().log_artifact(self.run_id, str(path), record["artifact_path"])


def next_batch(pending: list[dict]) -> list[dict]:
    """The records that go in one request: consecutive metric records up to MLflow's cap, else one."""
    if pending[0]["kind"] != "metrics":
        return pending[:1]
    count, total = 0, 0
    for record in pending:
        if record["kind"] != "metrics" or total + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        count, total = count + 1, total + len(record["metrics"])
    return pending[: max(count, 1)]


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)
