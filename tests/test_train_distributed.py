"""Real training runs on CPU: DeepSpeed (gloo), a tiny random BERT, the tiny SQuAD v2 fixture.

- two ranks through the deepspeed launcher, each head: identical parameters after every step, one
  MLflow run with the loss, the best model exported;
- data-parallel equivalence: 2 ranks x micro-batch 4 log the same losses as 1 rank x micro-batch 8;
- resume: stopped after step k and resumed with --resume auto, the remaining losses are bitwise those
  of the uninterrupted run, in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launcher" / "train.py"
FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
BIN = Path(sys.executable).parent
STEPS = 10  # an epoch of the fixture at 128/32/32: 87 windows, 10 global batches of 8 (7 sit it out)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from spanqa.testing import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_model_no_dropout(tiny_model, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: 1 x 8 and 2 x 4 windows can only agree when the forward pass
    does not depend on how the batch is split (dropout masks do)."""
    path = tmp_path_factory.mktemp("model") / "tiny-bert-no-dropout"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_flags(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--train_file", str(FIXTURE), "--dev_file", str(FIXTURE),
        "--output_dir", str(out), "--cache_dir", str(cache),
        "--max_seq_length", "128", "--doc_stride", "32", "--max_query_length", "32",
        "--train_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-3",
        "--warmup_steps", "2", "--logging_steps", "1", "--seed", "7", *extra,
    ]  # fmt: skip


def run(command: list[str], mlflow_db: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=mlflow_db.parent
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def one_process(flags: list[str], mlflow_db: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(LAUNCHER), *flags], mlflow_db)


def two_processes_deepspeed(flags: list[str], mlflow_db: Path) -> subprocess.CompletedProcess:
    deepspeed = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
    command = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(LAUNCHER), *flags]
    return run(command, mlflow_db)


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def mlflow_runs(mlflow_db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_db}")
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


def mlflow_losses(mlflow_db: Path, run_id: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{mlflow_db}").get_metric_history(run_id, "loss")
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def two_rank_span_run(tiny_model_no_dropout, cache_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("two-rank-span")
    out = work / "out"
    flags = train_flags(tiny_model_no_dropout, cache_dir, out, "--head", "span", "--log_param_checksum")
    two_processes_deepspeed(flags, work / "mlflow.db")
    return out, work / "mlflow.db"


@pytest.fixture(scope="module")
def one_rank_span_run(tiny_model_no_dropout, cache_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("one-rank-span")
    out = work / "out"
    one_process(train_flags(tiny_model_no_dropout, cache_dir, out, "--head", "span"), work / "mlflow.db")
    return out, work / "mlflow.db"


def check_two_rank_run(out: Path, mlflow_db: Path) -> None:
    steps = len(train_losses(out))
    sums = [
        [json.loads(line) for line in (out / "param_checksums" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert [s["step"] for s in sums[0]] == list(range(1, steps + 1))
    assert sums[0] == sums[1]  # every step: the same parameters on both ranks, bit for bit
    assert len({s["sha256"] for s in sums[0]}) == steps  # and they did change at every step
    runs = mlflow_runs(mlflow_db)
    assert len(runs) == 1
    assert runs[0].info.run_id == (out / "mlflow_run_id").read_text().strip()
    assert runs[0].data.params["world_size"] == "2"
    assert sorted(mlflow_losses(mlflow_db, runs[0].info.run_id)) == list(range(1, steps + 1))
    assert "exact" in runs[0].data.metrics and "f1" in runs[0].data.metrics
    assert 0 < runs[0].data.metrics["mfu"] < 1  # training reports its own model-FLOPs utilisation
    assert (out / "best_model" / "spanqa_config.json").is_file()
    assert (out / "eval" / "predictions.json").is_file()


def test_two_ranks_span_head_stay_identical(two_rank_span_run):
    check_two_rank_run(*two_rank_span_run)


def test_two_ranks_crf_head_stay_identical(tiny_model, cache_dir, tmp_path):
    out = tmp_path / "out"
    flags = train_flags(
        tiny_model, cache_dir, out, "--head", "crf", "--log_param_checksum", "--max_steps", "5"
    )
    two_processes_deepspeed(flags, tmp_path / "mlflow.db")
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 5]
    # stopped by --max_steps before any eval: checksums and MLflow as above, no model yet
    sums = [(out / "param_checksums" / f"rank{r}.jsonl").read_text() for r in (0, 1)]
    assert sums[0] == sums[1] and len(sums[0].splitlines()) == 5
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and sorted(mlflow_losses(tmp_path / "mlflow.db", runs[0].info.run_id)) == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_data_parallel_equivalence(two_rank_span_run, one_rank_span_run):
    """2 ranks x 4 windows and 1 rank x 8 windows see the same global batches: same losses (fp32)."""
    two, one = train_losses(two_rank_span_run[0]), train_losses(one_rank_span_run[0])
    assert sorted(two) == sorted(one) and len(one) == STEPS
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_resume_matches_an_uninterrupted_run(tiny_model, cache_dir, tmp_path):
    """With dropout on, so that the RNG states are part of what must come back."""
    uninterrupted, out, db = tmp_path / "uninterrupted", tmp_path / "out", tmp_path / "mlflow.db"
    one_process(train_flags(tiny_model, cache_dir, uninterrupted, "--max_steps", "6"), db)
    one_process(train_flags(tiny_model, cache_dir, out, "--max_steps", "3"), db)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    one_process(train_flags(tiny_model, cache_dir, out, "--max_steps", "6", "--resume", "auto"), db)
    resumed, expected = train_losses(out), train_losses(uninterrupted)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: expected[s] for s in (4, 5, 6)}  # bitwise
    assert resumed[1] != resumed[2]
    runs = {r.info.run_id for r in mlflow_runs(db)}
    assert run_id == (out / "mlflow_run_id").read_text().strip() and run_id in runs and len(runs) == 2
    assert mlflow_losses(db, run_id) == pytest.approx(resumed)


def test_preemption_signal_saves_and_the_rerun_finishes(tiny_model, cache_dir, tmp_path):
    """SIGUSR1 mid-training (SLURM's warning signal): a checkpoint at the next step boundary, exit 0;
    the same command with --resume auto finishes the schedule in the same MLflow run."""
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    flags = train_flags(tiny_model, cache_dir, out, "--resume", "auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), *flags],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert b"preemption signal: saving a checkpoint" in stderr
    saved = [p.name for p in (out / "checkpoints").iterdir() if (p / "complete").is_file()]
    stopped_at = max(train_losses(out))
    assert saved == [f"step-{stopped_at:08d}"] and stopped_at < STEPS
    run_id = (out / "mlflow_run_id").read_text().strip()
    one_process(flags, db)
    assert sorted(train_losses(out)) == list(range(1, STEPS + 1))
    assert [r.info.run_id for r in mlflow_runs(db)] == [run_id]


def two_processes_torchrun(
    target: list[str], flags: list[str], mlflow_db: Path
) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    rendezvous = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return run([torchrun, *rendezvous, *target, *flags], mlflow_db)


@pytest.mark.parametrize(
    "target", [[str(LAUNCHER)], ["-m", "spanqa.train"]], ids=["launcher-script", "module"]
)
def test_torchrun_trains_like_the_deepspeed_launcher(
    two_rank_span_run, tiny_model_no_dropout, cache_dir, tmp_path, target
):
    """`torchrun --nproc_per_node 2 launcher/train.py ...` and `torchrun -m spanqa.train ...`: the same
    two gloo ranks, the same seed, the same losses as through `deepspeed`, and one MLflow run."""
    out = tmp_path / "out"
    flags = train_flags(tiny_model_no_dropout, cache_dir, out, "--head", "span", "--log_param_checksum")
    two_processes_torchrun(target, flags, tmp_path / "mlflow.db")
    check_two_rank_run(out, tmp_path / "mlflow.db")
    torchrun, deepspeed = train_losses(out), train_losses(two_rank_span_run[0])
    assert sorted(torchrun) == sorted(deepspeed) == list(range(1, STEPS + 1))
    for step in deepspeed:
        assert torchrun[step] == pytest.approx(deepspeed[step], rel=1e-6, abs=1e-7), step
