"""Training throughput and model-FLOPs utilisation (MFU) of spanqa on whatever device this is.

Trains `--warmup` + `--steps` steps through spanqa's own Trainer and DeepSpeed engine (the ones
`launcher/train.py` runs) on synthetic windows whose lengths, question/context split and answer
positions are copied from a real window store (bench/synthetic.py), with a model built from a shape
alone (random weights: nothing to download), and reads what the Trainer measured itself about each
step (`spanqa.train.metrics.StepRecord`: windows, real tokens, model FLOPs, time; CUDA events on a
GPU). It reports, over the steps after the warm-up, samples/s, real tokens/s, the step time (median,
p10, p90), peak memory, the model FLOP/s and MFU = that ÷ the device's dense peak for the dtype
(NVIDIA's published figure for A100/H100/H200, else a measured matmul peak: the Trainer's).

    python bench/throughput.py --model_config tiny --steps 5 --warmup 2                 # CPU smoke test
    python bench/throughput.py --model_config minilm --head crf --steps 4 --warmup 1
    python bench/throughput.py --model_config spanbert-base --dtype bf16 --batch_size 32 --steps 50
    python bench/throughput.py --model_config spanbert-base --dtype fp16 --world_size 8 --json
    python bench/throughput.py --model path/to/hf_model --store prepared/train --head span

Lengths come from `--store DIR`; by default from the shared SQuAD v2 dev set prepared with the MiniLM
(BERT uncased) tokenizer when both are here, else from the measured dev histogram. `--world_size N`
re-launches this script through the deepspeed launcher (N ranks); `--batch_size` is per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spanqa import flags as flag_tree
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.testing import MODEL_SHAPES, placeholder_tokenizer, write_bert_dir
from synthetic import window_shapes, write_synthetic_store

DS_CONFIGS = {"fp32": "cpu_fp32.json", "bf16": "bf16_zero1.json", "fp16": "fp16_zero1.json"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model_config", choices=sorted(MODEL_SHAPES), help="a shape built with random weights"
    )
    model.add_argument("--model", help="a local Hugging Face model directory (its weights are used)")
    parser.add_argument("--head", choices=("span", "crf"), default="span")
    parser.add_argument("--dtype", choices=sorted(DS_CONFIGS), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    parser.add_argument("--batch_size", type=int, help="windows per step per rank (CUDA 32, CPU 8)")
    flag_tree.add_flags(parser, WindowSettings)  # the windows of the store whose lengths are copied
    parser.add_argument("--store", help="a window store whose lengths the synthetic windows copy")
    parser.add_argument("--world_size", type=int, default=1, help="ranks, through the deepspeed launcher")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (the Trainer's --compile)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work_dir", help="keep the model, store and run here (default: a temporary directory)"
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    args.model_config = args.model_config or (None if args.model else "spanbert-base")
    args.windows = flag_tree.build_given(WindowSettings, args)
    for flag in ("steps", "world_size"):
        if getattr(args, flag) < 1:
            raise SpanqaError(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise SpanqaError(f"--warmup: must not be negative, got {args.warmup}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise SpanqaError(f"--model: {args.model}: not a Hugging Face model directory (no config.json)")
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.dtype == "fp16" and not cuda:
        raise SpanqaError("--dtype: fp16 training needs a CUDA device (DeepSpeed has no fp16 on CPU)")
    args.batch_size = args.batch_size or (32 if cuda else 8)
    if args.batch_size < 1:
        raise SpanqaError(f"--batch_size: must be at least 1, got {args.batch_size}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_command(argv: list[str], world_size: int) -> list[str]:
    """This script under the deepspeed launcher: N ranks on this node, on a free port."""
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size)]
    return [*runner, "--master_port", str(free_port()), str(Path(__file__).resolve()), *argv]


def build_inputs(args: argparse.Namespace, work: Path) -> dict:
    """The model directory (random weights for --model_config) and one epoch of synthetic windows:
    exactly (warm-up + measured) steps × batch × world, so the run ends at its last measured step."""
    settings = args.windows
    shapes = window_shapes(args.store, settings, args.seed)
    if args.model_config is not None:
        shutil.rmtree(work / "model", ignore_errors=True)
        vocab = MODEL_SHAPES[args.model_config]["vocab_size"]
        model_dir = write_bert_dir(work / "model", args.model_config, placeholder_tokenizer(vocab), args.seed)
        label = f"{args.model_config} (random weights)"
    else:
        model_dir, label = Path(args.model).resolve(), str(args.model)
    n_windows = (args.warmup + args.steps) * args.batch_size * args.world_size
    write_synthetic_store(
        work / "prepared" / "train", shapes, n_windows, model_dir, settings.as_dict(), args.seed
    )
    inputs = {
        "model_dir": str(model_dir),
        "model_label": label,
        "lengths_source": shapes.source,
        "work": str(work),
    }
    (work / "inputs.json").write_text(json.dumps(inputs))
    return inputs


def train_args(args: argparse.Namespace, inputs: dict) -> list[str]:
    """launcher/train.py flags: one epoch over the synthetic store, no evaluation, one reduction (the
    loop's only host sync) at the end."""
    from spanqa.train.ds_engine import shipped_config_path

    flags = {
        "--model": inputs["model_dir"], "--output_dir": Path(inputs["work"]) / "run",
        "--prepared": Path(inputs["work"]) / "prepared", "--head": args.head,
        "--train_batch_size": args.batch_size * args.world_size, "--num_train_epochs": 1, "--warmup_steps": 0,
        "--logging_steps": args.warmup + args.steps,
        "--deepspeed_config": shipped_config_path(DS_CONFIGS[args.dtype]), "--num_workers": args.num_workers,
        "--seed": args.seed, "--run_name": f"throughput {inputs['model_label']} {args.head} {args.dtype}",
    }  # fmt: skip
    window_flags = flag_tree.to_argv(args.windows)
    return (
        [str(x) for pair in flags.items() for x in pair]
        + window_flags
        + (["--compile"] if args.compile else [])
    )


def rank_result(trainer, args: argparse.Namespace, cpu_share: float | None) -> dict:
    """This rank's figures over the measured steps, from the Trainer's own step records."""
    measured = trainer.metrics.records[args.warmup : args.warmup + args.steps]
    if len(measured) < args.steps:
        raise SpanqaError(
            f"--steps: the Trainer ran {len(trainer.metrics.records)} steps, fewer than asked for"
        )
    seconds = [r.seconds for r in measured]
    cuda = trainer.env.device.type == "cuda"
    memory = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "step_seconds": seconds, "wall_seconds": sum(seconds), "cpu_share": cpu_share,
        "windows": sum(r.windows for r in measured), "real_tokens": sum(r.real_tokens for r in measured),
        "padded_tokens": sum(r.padded_tokens for r in measured), "flops": sum(r.flops for r in measured),
        "peak_memory_bytes": memory, "peak_memory_kind": "cuda max allocated" if cuda else "cpu max RSS",
    }  # fmt: skip


def summarize(rank_results: list[dict], peak_flops: float) -> dict:
    """Whole-job figures from each rank's measured steps: throughput sums over ranks, MFU over all devices."""
    wall = max(r["wall_seconds"] for r in rank_results)
    windows, tokens = sum(r["windows"] for r in rank_results), sum(r["real_tokens"] for r in rank_results)
    achieved = sum(r["flops"] for r in rank_results) / wall
    step_seconds = [max(ts) for ts in zip(*(r["step_seconds"] for r in rank_results), strict=True)]
    shares = [r["cpu_share"] for r in rank_results if r["cpu_share"] is not None]
    return {
        "samples_per_s": windows / wall, "real_tokens_per_s": tokens / wall,
        "step_time_median_s": statistics.median(step_seconds),
        "step_time_p10_s": float(np.percentile(step_seconds, 10)),
        "step_time_p90_s": float(np.percentile(step_seconds, 90)),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rank_results),
        "achieved_tflops": achieved / 1e12, "achieved_tflops_per_device": achieved / len(rank_results) / 1e12,
        "peak_tflops_per_device": peak_flops / 1e12, "mfu": achieved / (peak_flops * len(rank_results)),
        "measured_steps": len(step_seconds), "measured_seconds": wall,
        "real_tokens_fraction": tokens / max(1, sum(r["padded_tokens"] for r in rank_results)),
        "cpu_share": min(shares) if shares else None, "load_average_1min": os.getloadavg()[0],
    }  # fmt: skip


def train_and_measure(args: argparse.Namespace, inputs: dict) -> dict | None:
    """Run the Trainer as launcher/train.py does; the report on rank 0, else None."""
    from spanqa.config import parse_train_args
    from spanqa.train.distributed import destroy_distributed, gather_to_main, init_distributed
    from spanqa.train.trainer import Trainer

    config = parse_train_args(train_args(args, inputs))
    env = init_distributed()
    try:
        trainer = Trainer(config, env)
        status = "FAILED"
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.train()
            share = (
                None
                if env.device.type == "cuda"
                else (time.process_time() - cpu) / ((time.perf_counter() - wall) * torch.get_num_threads())
            )
            gathered = gather_to_main(rank_result(trainer, args, share), env)
            status = "FINISHED"
        finally:
            trainer.close(status)  # before the work directory (and the MLflow store in it) goes
    finally:
        destroy_distributed()
    if gathered is None:
        return None
    peak = trainer.metrics.peak
    return {
        "device": peak.device, "world_size": env.world_size, "model": inputs["model_label"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "head": args.head, "dtype": args.dtype,
        "matmul_dtype": peak.dtype, "batch_size": args.batch_size, **args.windows.as_dict(),
        "compile": args.compile, "lengths_source": inputs["lengths_source"],
        "warmup": args.warmup, **summarize(gathered, peak.flops_per_s),
        "peak_memory_kind": gathered[0]["peak_memory_kind"], "peak_source": peak.source,
        "torch": torch.__version__,
    }  # fmt: skip


def print_table(r: dict) -> None:
    def rate(tflops: float) -> str:
        return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:.1f} GFLOP/s"

    ms = {k: 1000 * r[f"step_time_{k}_s"] for k in ("median", "p10", "p90")}
    rows = [
        ("device", f"{r['device']} × {r['world_size']}"),
        ("model", f"{r['model']} ({r['parameters'] / 1e6:.1f}M parameters), head {r['head']}"),
        ("dtype", f"{r['dtype']} (matmuls in {r['matmul_dtype']})"),
        ("batch", f"{r['batch_size']} windows/rank, max_seq_length {r['max_seq_length']}"),
        ("lengths", r["lengths_source"]),
        ("steps", f"{r['measured_steps']} measured after {r['warmup']} warm-up"),
        ("samples/s", f"{r['samples_per_s']:.2f}"),
        ("real tokens/s", f"{r['real_tokens_per_s']:.0f} ({100 * r['real_tokens_fraction']:.1f}% of padded)"),
        ("step time", f"median {ms['median']:.1f} ms (p10 {ms['p10']:.1f}, p90 {ms['p90']:.1f})"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
        ("model FLOP/s", f"{rate(r['achieved_tflops'])} ({rate(r['achieved_tflops_per_device'])}/device)"),
        ("device peak", f"{rate(r['peak_tflops_per_device'])} ({r['peak_source']})"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
    ]
    if r["cpu_share"] is not None:
        rows.append(
            (
                "cpu share",
                f"{100 * r['cpu_share']:.0f}% of its threads' wall time (load {r['load_average_1min']:.1f})",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ and args.world_size > 1:  # a rank started by the relaunch below
        work = Path(args.work_dir)
        result = train_and_measure(args, json.loads((work / "inputs.json").read_text()))
        if result is not None:  # rank 0: the launching process prints it, after the launcher's own lines
            (work / "result.json").write_text(json.dumps(result))
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="spanqa-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    # The Trainer's MLflow run goes beside the benchmark's files unless the user points it elsewhere:
    # a plain-file store, which starts in a moment where a new SQLite store spends ~15 s on migrations.
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ.update(
            MLFLOW_TRACKING_URI=(work.resolve() / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true"
        )
    try:
        inputs = build_inputs(args, work)
        if args.world_size > 1:
            (work / "result.json").unlink(missing_ok=True)  # a --work_dir may hold an earlier run's
            rest = [
                a for i, a in enumerate(argv) if a != "--work_dir" and (i == 0 or argv[i - 1] != "--work_dir")
            ]
            env = dict(os.environ)
            if not torch.cuda.is_available():  # CPU ranks share the cores: one thread each would fight less
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.world_size)))
            command = relaunch_command([*rest, "--work_dir", str(work)], args.world_size)
            code = subprocess.run(command, env=env, check=False).returncode
            if code != 0 or not (work / "result.json").is_file():
                raise SpanqaError(f"--world_size: the {args.world_size} ranks failed (exit status {code})")
            result = json.loads((work / "result.json").read_text())
        else:
            if "RANK" not in os.environ:  # one process without a launcher: the rendezvous DeepSpeed expects
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(free_port()))
            result = train_and_measure(args, inputs)
        print_table(result)
        if args.json:
            print(json.dumps(result), flush=True)
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpanqaError as err:
        print(f"bench/throughput.py: error: {err}", file=sys.stderr)
        sys.exit(2)
