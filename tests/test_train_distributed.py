"""Real training runs on CPU: DeepSpeed (gloo), a tiny random BERT, the tiny SQuAD v2 fixture.

- two ranks through the deepspeed launcher, each head: identical parameters after every step, one
  MLflow run with the loss, the best model exported;
- data-parallel equivalence: 2 ranks x micro-batch 4 log the same losses as 1 rank x micro-batch 8;
- resume: stopped after step k and resumed with --resume auto, the remaining losses are bitwise those
  of the uninterrupted run, in the same MLflow run.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from runs import (
    LAUNCHER,
    STEPS,
    deepspeed_command,
    mlflow_client,
    mlflow_losses,
    mlflow_runs,
    one_process_command,
    run,
    start,
    stopped_run,
    torchrun_command,
    train_flags,
    train_losses,
    wait_for_steps,
)

pytestmark = pytest.mark.slow


def one_process(flags: list[str], mlflow_db: Path) -> subprocess.CompletedProcess:
    return run(one_process_command(flags), mlflow_db)


def two_processes_deepspeed(flags: list[str], mlflow_db: Path) -> subprocess.CompletedProcess:
    return run(deepspeed_command(flags), mlflow_db)


def logged_steps(mlflow_db: Path, run_id: str) -> list[int]:
    return [step for step, _ in mlflow_losses(mlflow_db, run_id)]


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
    assert logged_steps(mlflow_db, runs[0].info.run_id) == list(range(1, steps + 1))
    assert "exact" in runs[0].data.metrics and "f1" in runs[0].data.metrics
    # question counts describe the dev set: params, not metrics (they would chart as flat lines)
    assert not {"total", "HasAns_total", "NoAns_total"} & set(runs[0].data.metrics)
    assert runs[0].data.params["dev.total"] == "51"
    experiment = mlflow_client(mlflow_db).get_experiment(runs[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
    stats = {a.path for a in mlflow_client(mlflow_db).list_artifacts(runs[0].info.run_id, "data/train/stats")}
    assert {
        f"data/train/stats/{n}" for n in ("stats.json", "question_length.png", "context_length.png")
    } <= stats
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
    assert len(runs) == 1 and logged_steps(tmp_path / "mlflow.db", runs[0].info.run_id) == [1, 2, 3, 4, 5]


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
    assert mlflow_losses(db, run_id) == sorted(resumed.items())


def test_preemption_signal_saves_and_the_rerun_finishes(tiny_model, cache_dir, tmp_path):
    """SIGUSR1 mid-training (SLURM's warning signal): a checkpoint at the next step boundary, exit 0;
    the same command with --resume auto finishes the schedule in the same MLflow run."""
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    epochs = 5  # few: the rerun trains to the end
    flags = train_flags(tiny_model, cache_dir, out, *stopped_run(epochs), "--resume", "auto")
    process = start(one_process_command(flags), db)
    wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert b"preemption signal: saving a checkpoint" in stderr
    saved = [p.name for p in (out / "checkpoints").iterdir() if (p / "complete").is_file()]
    stopped_at = max(train_losses(out))
    assert saved == [f"step-{stopped_at:08d}"] and stopped_at < epochs * STEPS
    run_id = (out / "mlflow_run_id").read_text().strip()
    one_process(flags, db)
    assert sorted(train_losses(out)) == list(range(1, epochs * STEPS + 1))
    assert [r.info.run_id for r in mlflow_runs(db)] == [run_id]


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
    run(torchrun_command(target, flags), tmp_path / "mlflow.db")
    check_two_rank_run(out, tmp_path / "mlflow.db")
    torchrun, deepspeed = train_losses(out), train_losses(two_rank_span_run[0])
    assert sorted(torchrun) == sorted(deepspeed) == list(range(1, STEPS + 1))
    for step in deepspeed:
        assert torchrun[step] == pytest.approx(deepspeed[step], rel=1e-6, abs=1e-7), step
