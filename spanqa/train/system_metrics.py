"""MLflow system metrics of the training run, from rank 0: CPU, memory, disk, network, and NVIDIA GPUs.

MLflow's own monitor (`mlflow.system_metrics`) samples in a thread of rank 0's process every
SAMPLING_INTERVAL_S and logs `system/...` metrics to the run. It needs psutil (a dependency of
deepspeed, so normally present), and pynvml (the package nvidia-ml-py) for GPU utilisation and memory;
without psutil, `--system_metrics` does nothing. Only rank 0's node is sampled. What it costs is
measured by bench/system_metrics.py (see the README).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from typing import Any

from spanqa.io import first_line

log = logging.getLogger(__name__)

SAMPLING_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
STOP_TIMEOUT_S = 30.0  # the monitor's last upload may wait on a server that went away: not for long


class SystemMetrics:
    """A running MLflow SystemMetricsMonitor, or nothing (other ranks, flag off, no psutil)."""

    def __init__(self, monitor: Any = None) -> None:
        self.monitor = monitor

    @property
    def running(self) -> bool:
        return self.monitor is not None

    def stop(self) -> None:
        """Stop sampling and send the last samples, giving up after STOP_TIMEOUT_S."""
        if self.monitor is None:
            return
        # finish() joins the sampler thread, which may be inside a retried HTTP call: joined from a
        # thread of our own, so that a dead server delays the end of training by STOP_TIMEOUT_S at most.
        finisher = threading.Thread(target=self.monitor.finish, name="spanqa-system-metrics", daemon=True)
        finisher.start()
        finisher.join(STOP_TIMEOUT_S)
        if finisher.is_alive():
            log.warning("MLflow system metrics did not stop within %.0f s; left behind", STOP_TIMEOUT_S)
        self.monitor = None


def start_system_metrics(tracker: Any, enabled: bool) -> SystemMetrics:
    """Sample system metrics into the tracker's run (a no-op SystemMetrics where there is no run)."""
    run_id = getattr(tracker, "run_id", None)
    if not enabled or run_id is None:
        return SystemMetrics()
    if not tracker.flush():
        log.warning("MLflow is unreachable: no system metrics for this run")
        return SystemMetrics()
    if importlib.util.find_spec("psutil") is None:
        log.info("psutil is not installed: no MLflow system metrics (pip install psutil)")
        return SystemMetrics()
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a resumed run continues its system metrics' steps instead of restarting at 0
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SAMPLING_INTERVAL_S,
            resume_logging=True,
            tracking_uri=tracker.tracking_uri,
        )
        monitor.start()
    except Exception as err:  # noqa: BLE001 - monitoring is optional; training goes on without it
        log.warning("MLflow system metrics could not start (%s); training goes on", first_line(err))
        return SystemMetrics()
    return SystemMetrics(monitor)
