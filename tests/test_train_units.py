"""Trainer pieces that need no training run: schedule, eval points, checkpoints, signals, env."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from spanqa.config import OptimizerSettings
from spanqa.errors import SpanqaError
from spanqa.train import checkpoint as ckpt
from spanqa.train.distributed import env_from_environ
from spanqa.train.entry import default_omp_threads
from spanqa.train.optim import eval_points, is_decayed, make_optimizer, warmup_linear_decay
from spanqa.train.signals import PreemptionFlag, slurm_job_to_requeue


def test_warmup_then_linear_decay_to_zero():
    factor = warmup_linear_decay(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in (0, 2, 4, 8, 12, 13)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert warmup_linear_decay(0, 10)(0) == 1.0


def test_eval_points_spread_over_each_epoch_and_include_the_last_step():
    assert eval_points(10, 30, 1, 0) == {10, 20, 30}
    assert eval_points(10, 20, 2, 0) == {5, 10, 15, 20}
    assert eval_points(10, 25, 1, 0) == {10, 20, 25}  # 2.5 epochs: the end counts too
    assert eval_points(10, 30, 1, 7) == {7, 10, 14, 20, 21, 28, 30}
    assert eval_points(10, 30, 0, 0) == {30}


def test_no_weight_decay_on_biases_and_layer_norms():
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(2, 2), "LayerNorm": torch.nn.LayerNorm(2)})
    decayed = {name for name, p in model.named_parameters() if is_decayed(name, p)}
    assert decayed == {"dense.weight"}


def test_the_head_learns_at_its_multiplier_and_decay_rules_hold_in_every_group():
    from spanqa.model.heads import CRFHead

    encoder = torch.nn.ModuleDict({"dense": torch.nn.Linear(2, 2), "LayerNorm": torch.nn.LayerNorm(2)})
    model = torch.nn.ModuleDict({"encoder": encoder, "head": CRFHead(2)})
    settings = OptimizerSettings(learning_rate=1e-4, weight_decay=0.01, head_lr_multiplier=50.0)
    optimizer = make_optimizer(model, settings, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
    ]
    assert groups == [
        (1e-4, 0.01, ["encoder.dense.weight"]),
        (1e-4, 0.0, ["encoder.LayerNorm.bias", "encoder.LayerNorm.weight", "encoder.dense.bias"]),
        (
            50 * 1e-4,
            0.01,
            [
                "head.crf.end_transitions",
                "head.crf.start_transitions",
                "head.crf.transitions",
                "head.emission.weight",
            ],
        ),
        (50 * 1e-4, 0.0, ["head.emission.bias"]),
    ]
    # the schedule scales every group's own rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(2, 10))
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-5, 5e-5, 2.5e-3, 2.5e-3])
    with pytest.raises(SpanqaError, match="--head_lr_multiplier"):
        OptimizerSettings(head_lr_multiplier=0.0)


def fake_checkpoint(root, step: int, complete: bool = True):
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    if complete:
        ckpt.mark_complete(path, {"step": step})
    return path


def test_latest_complete_checkpoint_skips_interrupted_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        fake_checkpoint(root, step, complete)
    assert ckpt.latest_verified(root) == root / "step-00000020"
    assert ckpt.resolve_resume("auto", tmp_path) == root / "step-00000020"
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(SpanqaError, match="--resume: .*step-00000030: not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step-00000030"), tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-10]), "bytes, the manifest says"),  # truncated
        (lambda f: f.write_bytes(bytes(reversed(f.read_bytes()))), "CRC-32 differs"),  # same size, changed
        (lambda f: f.unlink(), "missing"),
        (lambda f: (f.parent / "complete").write_text("junk"), "not a checkpoint manifest"),
    ],
    ids=["truncated", "changed", "missing", "junk-marker"],
)
def test_a_damaged_checkpoint_is_passed_over_for_the_newest_that_verifies(tmp_path, caplog, damage, said):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    newest = fake_checkpoint(root, 20)
    damage(newest / "mp_rank_00_model_states.pt")
    assert ckpt.latest_verified(root) == root / "step-00000010"
    assert "passing over step-00000020" in caplog.text and said in caplog.text
    with pytest.raises(SpanqaError, match=said):  # named explicitly, it is refused
        ckpt.resolve_resume(str(newest), tmp_path)


def test_when_no_checkpoint_verifies_resume_auto_refuses_instead_of_starting_over(tmp_path):
    root = tmp_path / "checkpoints"
    only = fake_checkpoint(root, 10)
    (only / "complete").write_text("junk")
    with pytest.raises(SpanqaError, match=r"--resume auto: none of the 1 checkpoint\(s\) .* is intact"):
        ckpt.resolve_resume("auto", tmp_path)


def test_a_checkpoint_resumes_only_with_the_head_it_was_trained_with(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    ckpt.mark_complete(path, {"step": 10, "head": "span"})
    ckpt.check_same_head(path, {"head": "span"})
    with pytest.raises(SpanqaError, match="--head crf: .* was trained with --head span"):
        ckpt.check_same_head(path, {"head": "crf", "crf_tags": "span"})
    crf = fake_checkpoint(tmp_path, 20)
    ckpt.mark_complete(crf, {"step": 20, "head": "crf", "crf_tags": "bio"})
    ckpt.check_same_head(crf, {"head": "crf", "crf_tags": "bio"})
    with pytest.raises(SpanqaError, match=r"^--crf_tags span: .* was trained with --crf_tags bio; resume it"):
        ckpt.check_same_head(crf, {"head": "crf", "crf_tags": "span"})
    older = fake_checkpoint(tmp_path, 30)  # written before the tag scheme was recorded: not checked
    ckpt.mark_complete(older, {"step": 30, "head": "crf"})
    ckpt.check_same_head(older, {"head": "crf", "crf_tags": "span"})


def test_a_crafted_checkpoint_file_cannot_run_code(tmp_path):
    """A pickle that calls a function on load (here: os.system) is refused by the weights-only loader."""
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "rng-rank0.pt"
    bad.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(SpanqaError, match="refused to load"):
        ckpt.safe_load(bad)
    assert not marker.exists()


def test_a_world_size_change_is_refused_only_for_a_partitioned_optimizer_state(tmp_path):
    whole = fake_checkpoint(tmp_path, 10)
    ckpt.check_world_size(whole, world_size=4)  # ZeRO stage 0 in fp32: the optimizer state is whole
    partitioned = tmp_path / "p"
    partitioned.mkdir()
    (partitioned / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    ckpt.mark_complete(partitioned, {"step": 10, "world_size": 2})
    ckpt.check_world_size(partitioned, world_size=2)
    with pytest.raises(SpanqaError, match="written by 2 ranks with a partitioned optimizer state"):
        ckpt.check_world_size(partitioned, world_size=1)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ckpt.tag_for(4)).mkdir()  # being written right now: never touched
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003", "step-00000004"]


def test_rng_states_round_trip(tmp_path):
    ckpt.save_rng(tmp_path, rank=1)
    expected = torch.rand(3)
    ckpt.set_rng_state(ckpt.load_rng(tmp_path, rank=1))
    assert torch.equal(torch.rand(3), expected)
    assert ckpt.load_rng(tmp_path, rank=5) is None


def test_preemption_flag_catches_usr1_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptionFlag()
    flag.arm()
    assert not flag.is_set
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.is_set and flag.wants_requeue
    flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sigterm_stops_without_asking_for_a_requeue():
    before = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag()
    flag.arm()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the flag handles it
        assert flag.is_set and not flag.wants_requeue
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.wants_requeue
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_slurm_job_to_requeue_addresses_array_tasks():
    assert slurm_job_to_requeue({}) is None
    assert slurm_job_to_requeue({"SLURM_JOB_ID": "17"}) == "17"
    array = {"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "16", "SLURM_ARRAY_TASK_ID": "1"}
    assert slurm_job_to_requeue(array) == "16_1"


def test_omp_threads_default_only_for_many_processes_and_only_when_unset():
    env = {"WORLD_SIZE": "2"}
    assert default_omp_threads(env) and env["OMP_NUM_THREADS"] == "1"
    env = {"WORLD_SIZE": "2", "OMP_NUM_THREADS": "4"}
    assert not default_omp_threads(env) and env["OMP_NUM_THREADS"] == "4"
    env = {}
    assert not default_omp_threads(env) and "OMP_NUM_THREADS" not in env


def test_env_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SpanqaError, match="RANK: 3"):
        env_from_environ()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SpanqaError, match="MASTER_ADDR"):
        env_from_environ()


def test_ctrl_c_stops_like_sigterm_and_before_training_ends_the_process_quietly():
    flag = PreemptionFlag()
    try:
        with pytest.raises(SystemExit) as stopped:  # nothing trained yet: nothing to save
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 128 + signal.SIGINT
        flag.arm()
        os.kill(os.getpid(), signal.SIGINT)  # training: the flag is set, the run saves and ends
        assert flag.is_set and not flag.wants_requeue
    finally:
        flag.restore()


def test_a_rank_stops_when_its_launcher_dies(tmp_path):
    """A process started like a rank (LOCAL_RANK set) under a parent that is killed gets SIGTERM."""
    import subprocess
    import sys
    import textwrap

    child = textwrap.dedent(
        f"""
        import signal, sys, time
        from spanqa.train.signals import watch_launcher
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
        watch_launcher(interval_s=0.1)
        open({str(tmp_path / "ready")!r}, "w").close()
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        open({str(tmp_path / "result")!r}, "w").write("stopped" if got else "ran on")
        """
    )
    parent = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    )
    env = {**os.environ, "LOCAL_RANK": "0"}
    launcher = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        for _ in range(300):
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        for _ in range(300):
            if (tmp_path / "result").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "result").read_text() == "stopped"
    finally:
        if launcher.poll() is None:
            launcher.kill()
