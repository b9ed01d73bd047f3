"""What `--system_metrics` costs rank 0: MLflow's sampler, one sample at a time, against a real store.

    .venv/bin/python bench/system_metrics.py [--samples 50] [--json]

MLflow's SystemMetricsMonitor (what spanqa.train.system_metrics starts) does, every 10 s in a thread of
rank 0's process: collect (psutil CPU/memory/disk/network, pynvml GPUs where there are any), read the
run's status from the store, and log the sample as a metric batch. This runs exactly those calls of a
real monitor on a real run in a fresh SQLite store (a temporary directory), --samples times, and reports
the median wall and CPU time of one sample and the share of one core that is at the 10 s interval.
With --json the last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spanqa.train.system_metrics import SAMPLING_INTERVAL_S  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def time_samples(samples: int, uri: str) -> tuple[list[float], list[float], list[str]]:
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    wall, cpu = [], []
    for _ in range(samples + 1):  # the first sample warms up psutil and the store's connection
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        monitor.collect_metrics()
        client.get_run(run_id)  # the sampler's status check
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()  # sent now, so that the store's write is in this sample's time
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.thread_time() - start_cpu)
    names = sorted(client.get_run(run_id).data.metrics)
    return wall[1:], cpu[1:], names


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="spanqa-bench-sysmetrics-") as tmp:
        os.chdir(tmp)  # the store's artifact root (./mlruns) goes there too
        wall, cpu, names = time_samples(args.samples, f"sqlite:///{Path(tmp) / 'mlflow.db'}")
    result = {
        "samples": args.samples,
        "metrics": names,
        "wall_ms_per_sample": round(1e3 * statistics.median(wall), 2),
        "cpu_ms_per_sample": round(1e3 * statistics.median(cpu), 2),
        "interval_s": SAMPLING_INTERVAL_S,
        "core_share_percent": round(100 * statistics.median(cpu) / SAMPLING_INTERVAL_S, 4),
    }
    print(
        f"{len(names)} metrics per sample; one sample: {result['wall_ms_per_sample']} ms wall, "
        f"{result['cpu_ms_per_sample']} ms CPU (median of {args.samples}); every {SAMPLING_INTERVAL_S:g} s "
        f"that is {result['core_share_percent']}% of one core"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
