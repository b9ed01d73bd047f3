"""spanqa's GPU paths on a CUDA device: `pytest -m gpu` (bench/gpu_check.sh runs it on a GPU machine).

Skipped without CUDA, with the reason. On the GPU:
- the fused Triton CRF is what CUDA tensors take, and its log-likelihood, gradients, marginals and
  Viterbi equal the torch scan's in fp32 and under bf16/fp16 autocast (the CRF computes in fp32 inside;
  fp32 is also checked against float64 on the CPU);
- DeepSpeed fp16 and bf16 engines (the shipped ZeRO-1 configs) train the tiny model 30 steps through the
  real Trainer (launcher/train.py): finite losses, parameters that move at every step but the skipped
  ones, loss scale and skipped steps reported under fp16;
- the fast paths are taken: bf16 parameters on the GPU, SDPA attention with a fused kernel, fused AdamW,
  pinned host batches;
- a checkpoint saved on the GPU resumes to the same losses as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spanqa.model.crf import CRF, torch_scan_only

FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
LAUNCHER = Path(__file__).resolve().parent.parent / "launcher" / "train.py"
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False): bench/gpu_check.sh runs it on a GPU"
FUSED_KERNELS = ("_forward_kernel", "_backward_kernel", "_viterbi_kernel")  # spanqa.model.crf_triton
FUSED_ATTENTION = (
    "flash",
    "efficient",
    "cudnn",
)  # aten::_scaled_dot_product_{flash,efficient,cudnn}_attention
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def profiled_names(fn) -> set[str]:
    """Names of the ops and CUDA kernels one call of fn runs (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events()}


# ----------------------------------------------------------------------------------------- the CRF


def crf_inputs(num_tags: int, seed: int):
    """A CRF with large random parameters, a linear emission layer, hidden states, tags and masks
    whose blocks are full, late, a single token, empty and in the middle."""
    gen = torch.Generator().manual_seed(seed)
    crf = CRF(num_tags)
    layer = torch.nn.Linear(32, num_tags)
    with torch.no_grad():
        for p in [*crf.parameters(), *layer.parameters()]:
            p.copy_(torch.rand(p.shape, generator=gen) * 4 - 2)
    batch, length = 10, 97
    starts = torch.tensor([0, 30, 96, 5, 10, 0, 1, 50, 20, 3]).view(-1, 1)
    lengths = torch.tensor([97, 67, 1, 0, 40, 60, 96, 2, 77, 33]).view(-1, 1)
    positions = torch.arange(length).view(1, -1)
    mask = (positions >= starts) & (positions < starts + lengths)
    hidden = torch.randn(batch, length, 32, generator=gen)
    tags = torch.randint(0, num_tags, (batch, length), generator=gen)
    return crf.cuda(), layer.cuda(), hidden.cuda(), tags.cuda(), mask.cuda()


def half_emissions(layer, hidden, mode: str) -> torch.Tensor:
    """The emission layer's output: fp32, or fp16/bf16 inside an autocast region."""
    with (
        torch.no_grad(),
        torch.autocast("cuda", dtype=AUTOCAST[mode] or torch.float16, enabled=mode != "fp32"),
    ):
        return layer(hidden)


def crf_outputs(crf, raw, tags, mask, mode: str) -> dict[str, torch.Tensor]:
    """Log-likelihood, its gradients (backward outside autocast, as autocast asks), marginals and
    Viterbi inside an fp16/bf16 autocast region (or none), on `raw` emissions upcast to fp32 as
    CRFHead does."""
    crf.zero_grad()
    emissions = raw.float().requires_grad_(True)
    with torch.autocast("cuda", dtype=AUTOCAST[mode] or torch.float16, enabled=mode != "fp32"):
        llh = crf(emissions, tags, mask, reduction="none")
        marginals = crf.marginals(emissions, mask)
        score, path = crf.viterbi(emissions, mask)
    weights = torch.arange(1, llh.shape[0] + 1, device=llh.device, dtype=llh.dtype)  # a gradient per row
    (llh * weights).sum().backward()
    grads = {f"grad_{name}": p.grad.clone() for name, p in crf.named_parameters()}
    out = {"llh": llh.detach(), "marginals": marginals, "score": score, "path": path, **grads}
    return {**out, "grad_emissions": emissions.grad}


def test_cuda_tensors_take_the_fused_kernels_and_torch_scan_only_turns_them_off():
    crf, layer, hidden, tags, mask = crf_inputs(3, seed=0)
    raw = half_emissions(layer, hidden, "fp32")
    fused = profiled_names(lambda: crf_outputs(crf, raw, tags, mask, "fp32"))
    assert all(any(kernel in name for name in fused) for kernel in FUSED_KERNELS), sorted(fused)
    with torch_scan_only():
        scan = profiled_names(lambda: crf_outputs(crf, raw, tags, mask, "fp32"))
    assert not any(kernel in name for name in scan for kernel in FUSED_KERNELS)


@pytest.mark.parametrize("mode", sorted(AUTOCAST))
@pytest.mark.parametrize("num_tags", [3, 5])
def test_fused_crf_equals_the_torch_scan_on_cuda(mode, num_tags):
    crf, layer, hidden, tags, mask = crf_inputs(num_tags, seed=num_tags)
    raw = half_emissions(layer, hidden, mode)
    assert raw.dtype == (AUTOCAST[mode] or torch.float32)
    fused = crf_outputs(crf, raw, tags, mask, mode)
    with torch_scan_only():
        scan = crf_outputs(crf, raw, tags, mask, mode)
    assert fused["llh"].dtype == torch.float32 and torch.isfinite(fused["llh"]).all()
    for name in fused:
        if name != "path":
            torch.testing.assert_close(fused[name], scan[name], rtol=1e-5, atol=1e-4, msg=name)
    if not torch.equal(fused["path"], scan["path"]):  # only a tie between best paths may differ
        rescored = crf.gold_score(raw.float(), fused["path"], mask)
        torch.testing.assert_close(rescored, scan["score"], rtol=1e-5, atol=1e-4)
    # fp32 inside: outside any autocast region the same emissions give the same log-likelihood
    plain = crf(raw.float(), tags, mask, reduction="none").detach()
    torch.testing.assert_close(fused["llh"], plain, rtol=1e-6, atol=1e-5)


def test_fused_crf_equals_float64_on_the_cpu():
    crf, layer, hidden, tags, mask = crf_inputs(5, seed=11)
    raw = half_emissions(layer, hidden, "fp32")
    fused = crf_outputs(crf, raw, tags, mask, "fp32")
    reference = CRF(5).double()
    reference.load_state_dict(crf.state_dict())
    emissions = raw.double().cpu()
    llh = reference(emissions, tags.cpu(), mask.cpu(), reduction="none")
    torch.testing.assert_close(fused["llh"].double().cpu(), llh, rtol=1e-5, atol=1e-4)
    score, _ = reference.viterbi(emissions, mask.cpu())
    torch.testing.assert_close(fused["score"].double().cpu(), score, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------- DeepSpeed + Trainer
# Each run is a process of its own (launcher/train.py, a world of one): DeepSpeed keeps its process
# groups in module globals, so a second engine in one process would meet the first one's groups.


def mlflow_env(where: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": (where / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def train_flags(model: Path, cache: Path, out: Path, ds_config: str, *extra: str) -> list[str]:
    """30 steps: 3 epochs of the fixture's 87 windows at 128/32/32 in global batches of 8."""
    from spanqa.train.ds_engine import shipped_config_path

    return [
        "--model", str(model), "--train_file", str(FIXTURE), "--output_dir", str(out),
        "--cache_dir", str(cache), "--max_seq_length", "128", "--doc_overlap", "32",
        "--max_query_length", "32", "--train_batch_size", "8", "--num_train_epochs", "3",
        "--learning_rate", "5e-4", "--warmup_steps", "3", "--logging_steps", "1", "--seed", "5",
        "--deepspeed_config", str(shipped_config_path(ds_config)), *extra,
    ]  # fmt: skip


def train(flags: list[str], out: Path) -> list[dict]:
    """launcher/train.py in a process of its own; the step records of its train_log.jsonl."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(mlflow_env(out.parent))
    done = subprocess.run(
        [sys.executable, str(LAUNCHER), *flags], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def param_changes(out: Path) -> list[bool]:
    """Whether the parameters changed at each step after the first (--log_param_checksum)."""
    lines = (out / "param_checksums" / "rank0.jsonl").read_text().splitlines()
    sums = [json.loads(line)["sha256"] for line in lines]
    return [a != b for a, b in zip(sums, sums[1:], strict=False)]


@pytest.fixture(scope="module")
def fp16_run(tiny_model, cache_dir, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fp16") / "out"
    return train(train_flags(tiny_model, cache_dir, out, "fp16_zero1.json", "--log_param_checksum"), out), out


@pytest.fixture(scope="module")
def bf16_run(tiny_model, cache_dir, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("bf16") / "out"
    return train(train_flags(tiny_model, cache_dir, out, "bf16_zero1.json", "--log_param_checksum"), out), out


@pytest.mark.parametrize("run", ["fp16_run", "bf16_run"])
def test_deepspeed_engine_trains_the_tiny_model_30_steps(run, request):
    records, out = request.getfixturevalue(run)
    fp16 = run == "fp16_run"
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) for r in records), [r["loss"] for r in records]
    assert all(0 < r["mfu"] < 1 for r in records)
    changed = param_changes(out)
    if fp16:
        assert all(r["loss_scale"] >= 1 for r in records)
        skipped = [int(r["skipped_steps"]) for r in records]
        assert skipped == sorted(skipped) and skipped[-1] < 30  # overflowed steps counted, not all
        # a skipped (overflowed) step leaves the parameters alone; every other step moves them
        assert changed == [b == a for a, b in zip(skipped, skipped[1:], strict=False)]
    else:
        assert not any("loss_scale" in r for r in records) and all(changed)


def test_a_checkpoint_saved_on_gpu_resumes_to_the_same_losses(fp16_run, tiny_model, cache_dir, tmp_path):
    """fp16, so that the loss scaler's state is part of what must come back."""
    uninterrupted, _ = fp16_run
    out = tmp_path / "out"
    flags = train_flags(tiny_model, cache_dir, out, "fp16_zero1.json", "--log_param_checksum")
    stopped = train([*flags, "--max_steps", "15"], out)
    assert [r["step"] for r in stopped] == list(range(1, 16))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000015"]
    resumed = train([*flags, "--resume", "auto"], out)
    assert [r["step"] for r in resumed] == list(range(1, 31))  # the first 15 kept in the run log
    for got, expected in zip(resumed[15:], uninterrupted[15:], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-3, abs=1e-4), expected["step"]
        assert (got["loss_scale"], got["skipped_steps"]) == (
            expected["loss_scale"],
            expected["skipped_steps"],
        )


def test_fast_paths_sdpa_fused_adamw_pinned_batches(tiny_model, cache_dir, tmp_path, monkeypatch):
    """In this process (its only engine): a Trainer's first steps, profiled."""
    from spanqa.config import parse_train_args
    from spanqa.train.distributed import destroy_distributed, init_distributed
    from spanqa.train.trainer import Trainer

    for name, value in mlflow_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    config = parse_train_args(train_flags(tiny_model, cache_dir, tmp_path / "out", "bf16_zero1.json"))
    env = init_distributed()
    try:
        trainer = Trainer(config, env)
        try:
            batch = next(iter(trainer.data.train_loader(0, 0)))
            names = profiled_names(lambda: trainer.train_step(batch))
            param, optimizer = next(trainer.model.parameters()), trainer.engine.basic_optimizer
        finally:
            trainer.close()
    finally:
        destroy_distributed()
    assert param.is_cuda and param.dtype == torch.bfloat16
    assert batch["input_ids"].is_pinned() and batch["attention_mask"].is_pinned()
    assert trainer.model.config._attn_implementation == "sdpa"
    attention = sorted(n for n in names if "scaled_dot_product" in n)
    assert "aten::scaled_dot_product_attention" in names, attention
    assert any(kind in n for n in attention for kind in FUSED_ATTENTION), attention  # not the math fallback
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert "aten::_fused_adamw_" in names, sorted(n for n in names if "adam" in n.lower())
