"""Runs that stop and go on: another world size, a kill -9 of every rank, Ctrl-C, a dead launcher, a stop in
the middle of a logging window, an output dir that holds a run, and evaluation never moving training.

Real training on CPU (DeepSpeed over gloo, the tiny random BERT, the tiny SQuAD v2 fixture)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from runs import (
    STEPS,
    deepspeed_command,
    mlflow_losses,
    mlflow_runs,
    one_process_command,
    run,
    start,
    stopped_run,
    train_flags,
    train_losses,
    wait_for_steps,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_no_dropout, cache_dir, tmp_path_factory) -> dict[int, float]:
    """Two ranks, six steps, no stop: the losses every other way of getting there must match."""
    work = tmp_path_factory.mktemp("uninterrupted")
    run(
        deepspeed_command(train_flags(tiny_model_no_dropout, cache_dir, work / "out", "--max_steps", "6")),
        work / "m.db",
    )
    return train_losses(work / "out")


@pytest.mark.parametrize(
    ("first", "then"),
    [((2, 1), (1, 2)), ((1, 2), (2, 1))],
    ids=["2-ranks-then-1-rank-x-accumulation-2", "1-rank-x-accumulation-2-then-2-ranks"],
)
def test_a_run_resumes_on_another_world_size(
    tiny_model_no_dropout, cache_dir, tmp_path, uninterrupted, first, then
):
    """The order of optimizer steps depends only on --train_batch_size and the seed: 2 ranks x
    accumulation 1 and 1 rank x accumulation 2 see the same windows at every step, and a checkpoint of
    one continues on the other (ZeRO stage 0: the optimizer state is whole)."""
    out, db = tmp_path / "out", tmp_path / "m.db"

    def command(ranks: int, accumulation: int, *extra: str) -> list[str]:
        flags = train_flags(
            tiny_model_no_dropout, cache_dir, out, "--gradient_accumulation_steps", str(accumulation), *extra
        )
        return deepspeed_command(flags) if ranks == 2 else one_process_command(flags)

    run(command(*first, "--max_steps", "3"), db)
    run(command(*then, "--max_steps", "6", "--resume", "auto"), db)
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_every_rank_killed_then_resumed_leaves_mlflow_equal_to_train_log(tiny_model, cache_dir, tmp_path):
    """kill -9 of both ranks (and the launcher) at a random step after a checkpoint, then --resume auto:
    MLflow's loss history is train_log.jsonl's, point for point, none twice, none missing."""
    out, db = tmp_path / "out", tmp_path / "m.db"
    kill_after = random.Random(20261201).randint(4, 8)  # reproducible, and past the checkpoint at step 3
    # Three epochs: the kill lands long before the run's end on any machine (a finished run removes
    # its checkpoints, and a step of the tiny model takes 50-80 ms on 2 cores).
    epochs = 3
    flags = train_flags(
        tiny_model, cache_dir, out, "--num_train_epochs", str(epochs), "--eval_steps", "3", "--resume", "auto"
    )
    training = start(deepspeed_command(flags), db)
    try:
        wait_for_steps(out, kill_after, training)
    finally:
        os.killpg(training.pid, signal.SIGKILL)  # the launcher and both ranks, at once
        training.wait()
    assert (out / "checkpoints" / "step-00000003" / "complete").is_file()
    run(deepspeed_command(flags), db)
    logged = sorted(train_losses(out).items())
    assert [step for step, _ in logged] == list(range(1, epochs * STEPS + 1))
    (only_run,) = mlflow_runs(db)
    assert mlflow_losses(db, only_run.info.run_id) == logged  # every point once: none lost, none twice
    assert only_run.info.status == "FINISHED"


def test_ctrl_c_saves_closes_the_run_as_killed_and_prints_no_traceback(tiny_model, cache_dir, tmp_path):
    out, db = tmp_path / "out", tmp_path / "m.db"
    flags = train_flags(tiny_model, cache_dir, out, *stopped_run(30))
    training = start(one_process_command(flags), db)
    wait_for_steps(out, 2, training)
    training.send_signal(signal.SIGINT)
    _, stderr = training.communicate(timeout=240)
    assert training.returncode == 0, stderr[-3000:]
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "complete").is_file()]
    assert len(saved) == 1
    (only_run,) = mlflow_runs(db)
    assert only_run.info.status == "KILLED"


def test_ranks_stop_and_save_when_the_deepspeed_launcher_is_killed(tiny_model, cache_dir, tmp_path):
    """SIGTERM to the `deepspeed` command ends it at once; its ranks notice and stop as on SIGTERM."""
    out, db = tmp_path / "out", tmp_path / "m.db"
    epochs = 30  # the ranks look for their launcher once a second: they must still be training then
    flags = train_flags(tiny_model, cache_dir, out, *stopped_run(epochs))
    training = start(deepspeed_command(flags), db)
    wait_for_steps(out, 2, training)
    ranks = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank_of(int(p.name), out)
    ]
    assert len(ranks) == 2
    training.send_signal(signal.SIGTERM)  # the runner alone, not its process group
    training.wait(timeout=60)
    deadline = time.monotonic() + 240
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks), "ranks ran on after their launcher died"
    stopped_at = max(train_losses(out))
    saved = [p.name for p in (out / "checkpoints").iterdir() if (p / "complete").is_file()]
    assert saved == [f"step-{stopped_at:08d}"] and stopped_at < epochs * STEPS


def _is_rank_of(pid: int, out: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "--local_rank" in cmdline and str(out) in cmdline


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_a_stop_inside_a_logging_window_logs_the_same_window(tiny_model, cache_dir, tmp_path):
    """Logging every 4 steps, stopped at step 6: the resumed run's step-8 loss covers steps 5-8, like an
    uninterrupted run's (it was the mean of steps 7-8 only: the stop's open window is in its checkpoint)."""
    db = tmp_path / "m.db"
    logging = ("--logging_steps", "4")
    run(
        one_process_command(
            train_flags(tiny_model, cache_dir, tmp_path / "whole", *logging, "--max_steps", "8")
        ),
        db,
    )
    out = tmp_path / "out"
    run(one_process_command(train_flags(tiny_model, cache_dir, out, *logging, "--max_steps", "6")), db)
    run(
        one_process_command(
            train_flags(tiny_model, cache_dir, out, *logging, "--max_steps", "8", "--resume", "auto")
        ),
        db,
    )
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(out)
    assert sorted(resumed) == sorted(whole) == [4, 8]
    assert resumed[8] == pytest.approx(whole[8], rel=1e-9)


def test_evaluating_more_often_does_not_change_training(tiny_model, cache_dir, tmp_path):
    """With dropout on: nothing outside the training step (evaluation, the best model's export) draws from
    its random streams."""
    db = tmp_path / "m.db"
    run(one_process_command(train_flags(tiny_model, cache_dir, tmp_path / "rare", "--max_steps", "8")), db)
    often = train_flags(tiny_model, cache_dir, tmp_path / "often", "--max_steps", "8", "--eval_steps", "2")
    run(one_process_command(often), db)
    assert train_losses(tmp_path / "rare") == train_losses(tmp_path / "often")


def test_a_fresh_run_never_joins_the_run_a_directory_holds(tiny_model, cache_dir, tmp_path):
    out, db = tmp_path / "out", tmp_path / "m.db"
    run(one_process_command(train_flags(tiny_model, cache_dir, out, "--max_steps", "2")), db)
    (out / "notes.txt").write_text("the user's, not spanqa's")
    refused = run(
        one_process_command(train_flags(tiny_model, cache_dir, out, "--max_steps", "2")), db, ok=False
    )
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert (
        f"{out} holds a run already" in line and "--resume auto" in line and "--overwrite_output_dir" in line
    )
    run_ids = {r.info.run_id for r in mlflow_runs(db)}
    flags = train_flags(tiny_model, cache_dir, out, "--max_steps", "2", "--overwrite_output_dir")
    run(one_process_command(flags), db)
    assert (out / "notes.txt").read_text() == "the user's, not spanqa's"
    assert len({r.info.run_id for r in mlflow_runs(db)} - run_ids) == 1  # a new MLflow run, not the old one


def test_a_second_job_into_a_busy_directory_is_refused_naming_the_holder(tiny_model, cache_dir, tmp_path):
    out, db = tmp_path / "out", tmp_path / "m.db"
    first = start(
        one_process_command(train_flags(tiny_model, cache_dir, out, "--num_train_epochs", "30")), db
    )
    try:
        wait_for_steps(out, 1, first)
        second = run(
            one_process_command(train_flags(tiny_model, cache_dir, out, "--resume", "auto")), db, ok=False
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    line = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and f"{out} is in use by host " in line and f"pid {first.pid}" in line
    assert len(mlflow_runs(db)) == 1
    entries = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len({(e["kind"], e["step"]) for e in entries}) == len(entries)  # nothing logged twice
