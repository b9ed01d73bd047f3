"""Helpers for tests that run real training: the tiny models, the flags, the launchers, what a run leaves."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launcher" / "train.py"
FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
BIN = Path(sys.executable).parent
# `make demo DEMO_FLAGS=...` cut to a smoke run: tests/test_readme.py checks that make passes them to
# `spanqa demo`, tests/test_install.py runs that from the wheel
DEMO_SMOKE_FLAGS = ["--max_steps", "4", "--eval_steps", "4"]
STEPS = 10  # an epoch of the fixture at 128/32/32: 87 windows, 10 global batches of 8 (7 sit it out)


def no_dropout_copy(model: Path, out: Path) -> Path:
    """`model` without dropout: runs split differently (ranks, accumulation) can only agree when the
    forward pass does not depend on how the batch is split (dropout masks do)."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stopped_run(epochs: int) -> tuple[str, ...]:
    """Flags for a run a test stops by a signal: `epochs` epochs, so that the stop lands long before the
    end on any machine (a tiny-model step takes 40-80 ms on 2 cores, and a finished run removes its
    checkpoints), and no evaluation before the last step, so that any checkpoint is the stop's own."""
    return ("--num_train_epochs", str(epochs), "--eval_per_epoch", "0")


def train_flags(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--train_file", str(FIXTURE), "--dev_file", str(FIXTURE),
        "--output_dir", str(out), "--cache_dir", str(cache),
        "--max_seq_length", "128", "--doc_overlap", "32", "--max_query_length", "32",
        "--train_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "2", "--logging_steps", "1", "--seed", "7", *extra,
    ]  # fmt: skip


@functools.cache
def empty_mlflow_store() -> Path:
    """An MLflow sqlite store with its tables made and nothing in them, made once per test session: a
    training run that meets no store spends seconds making the tables (MLflow's migrations), one that
    meets a copy of this spends none. Runs made outside these helpers (the learning, demo, SLURM and
    tracking tests) still start from no store at all."""
    from mlflow.tracking import MlflowClient

    where = Path(tempfile.mkdtemp(prefix="spanqa-test-mlflow-"))
    atexit.register(shutil.rmtree, where, True)
    MlflowClient(f"sqlite:///{where / 'mlflow.db'}").search_experiments()  # makes the tables
    return where / "mlflow.db"


def environment(mlflow_db: Path) -> dict[str, str]:
    """The environment of a training command that logs to the sqlite store `mlflow_db` (a copy of the
    empty store when there is none yet)."""
    if not mlflow_db.exists():
        shutil.copyfile(empty_mlflow_store(), mlflow_db)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    for name in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
    ):
        env.pop(name, None)
    return env


def one_process_command(flags: list[str]) -> list[str]:
    return [sys.executable, str(LAUNCHER), *flags]


def deepspeed_command(flags: list[str], ranks: int = 2) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(LAUNCHER), *flags]


def torchrun_command(target: list[str], flags: list[str], ranks: int = 2) -> list[str]:
    """`torchrun` with `target` (the launcher script, or `-m spanqa.train`) on one host."""
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    host = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [torchrun, "--nproc_per_node", str(ranks), *host, *target, *flags]


def run(
    command: list[str], mlflow_db: Path, timeout: int = 300, ok: bool = True
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(mlflow_db),
        cwd=mlflow_db.parent,
    )
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def start(command: list[str], mlflow_db: Path) -> subprocess.Popen:
    """A training command in the background (its own process group, so that a test can signal all of it)."""
    return subprocess.Popen(
        command,
        env=environment(mlflow_db),
        cwd=mlflow_db.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 240) -> None:
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + timeout
    while not (log.is_file() and len(train_losses(out)) >= steps):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {steps} steps logged in {timeout} s"
        time.sleep(0.1)


def train_losses(out: Path) -> dict[int, float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def mlflow_client(mlflow_db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{mlflow_db}")


def mlflow_runs(mlflow_db: Path) -> list:
    client = mlflow_client(mlflow_db)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def mlflow_losses(mlflow_db: Path, run_id: str) -> list[tuple[int, float]]:
    """Every logged (step, loss) point of the run, duplicates included, by step."""
    return sorted((m.step, m.value) for m in mlflow_client(mlflow_db).get_metric_history(run_id, "loss"))
