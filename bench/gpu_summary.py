"""The GPU check's figures: the machine it ran on, the demo's results, and summary.json with the goals.

    python bench/gpu_summary.py environment ENV_JSON
    python bench/gpu_summary.py demo DEMO_OUTPUT_DIR DEMO_JSON --wall_seconds S
    python bench/gpu_summary.py summary OUTDIR --steps STEPS_JSON --scratch DIR

bench/gpu_check.py runs these. The summary computes every goal of the GPU issue from what the steps
measured (crf.json, throughput.json, demo.json in OUTDIR) and nothing else: a goal whose figure is
missing (a step that failed or was skipped) is reported as not measured, and on a dry run (CPU) no
goal is judged. Projections of whole runs are arithmetic on measured rates, named as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

# The reference report's runs (README: one GPU, 50k questions, 6 epochs at 384/128).
REFERENCE_RUN = {"questions": 50_000, "epochs": 6, "minutes": {"span": 252, "crf": 567}}
# SpanBERT's SQuAD 2.0 recipe: 4 epochs of the full train set (130,319 questions) at 512/128.
SPANBERT_RECIPE = {"questions": 130_319, "epochs": 4}
# The CPU demo's figures (README, `time make demo`, 2 CPU cores, 2026-12-02), to set the GPU's beside.
CPU_DEMO = {"exact": 38.72, "f1": 41.89, "HasAns_f1": 32.91, "tuned_f1": 48.46, "minutes": 13.4}
GOALS = {
    "mfu_bf16_span": ("MFU of SpanBERT-base, bf16, batch 32, span head", ">=", 0.45),
    "crf_fwd_bwd_vs_torch_scan": ("Triton CRF forward+backward over the torch scan, B32xT384xK3", ">=", 10.0),
    "crf_fwd_bwd_vs_pytorch_crf": ("Triton CRF forward+backward over pytorch-crf, B32xT384xK3", ">=", 100.0),
    "crf_head_step_overhead_bf16": ("CRF head's step time over the span head's, minus 1 (bf16)", "<=", 0.05),
    "reference_run_minutes_span": ("the reference report's run on this GPU, span head (minutes)", "<", 5.0),
    "reference_run_minutes_crf": ("the reference report's run on this GPU, CRF head (minutes)", "<", 5.0),
}
PACKAGES = (
    "torch",
    "triton",
    "deepspeed",
    "transformers",
    "tokenizers",
    "mlflow-skinny",
    "numpy",
    "pytorch-crf",
)


# ------------------------------------------------------------------------------------ environment


def environment() -> dict:
    """Versions, the GPU and its driver, and a measured bf16 matmul rate (context for the MFU)."""
    import platform

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    info["packages"] = {name: installed_version(name) for name in PACKAGES}
    info["cuda_runtime"] = torch.version.cuda
    if not torch.cuda.is_available():
        return {**info, "device": "cpu", "gpu": None}
    from spanqa.flops import measured_matmul_peak

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    flops, n = measured_matmul_peak(device, "bf16", repeats=10)
    gpu = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "driver": nvidia_smi("driver_version"),
        "cudnn": torch.backends.cudnn.version(),
        "bf16_matmul_tflops": flops / 1e12,
        "bf16_matmul_measured": f"best of 10 {n}x{n}x{n} bf16 matmuls (spanqa.flops.measured_matmul_peak)",
    }
    return {**info, "device": "cuda", "gpu": gpu}


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_smi(query: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


# ------------------------------------------------------------------------------------------- demo


def demo_figures(out: Path, wall_seconds: float) -> dict:
    """EM/F1 of the demo's last evaluation, and its time per epoch (the Trainer's train_seconds, which
    include each epoch's evaluation and checkpoint, over the epochs trained)."""
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    seconds = train_seconds(out)
    # a run cut short by --max_steps (the dry run) may stop before its first logged loss
    epochs, steps = report["epoch"], report["step"]
    names = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "best_f1", "raw_exact", "total")
    figures = {name: report[name] for name in names if name in report}
    figures.update(
        epochs=epochs, steps=steps, final_loss=train[-1]["loss"] if train else None, train_seconds=seconds,
        seconds_per_epoch=seconds / epochs if seconds is not None and epochs else None,
        wall_seconds=wall_seconds, cpu_demo=CPU_DEMO,
    )  # fmt: skip
    return figures


def train_seconds(out: Path) -> float | None:
    """The run's train_seconds metric, from its MLflow run (MLFLOW_TRACKING_URI)."""
    from mlflow import MlflowClient

    run_id = (out / "mlflow_run_id").read_text().strip()
    history = MlflowClient().get_metric_history(run_id, "train_seconds")
    return history[-1].value if history else None


# ---------------------------------------------------------------------------------------- summary


def pytest_results(junit: Path) -> dict | None:
    """Counts and each test's outcome from pytest's JUnit XML."""
    if not junit.is_file():
        return None
    tests = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "").split("\n")[0] or None
        name = f"{case.get('classname')}::{case.get('name')}"
        tests.append(
            {"test": name, "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
        )
    counts = {
        kind: sum(t["outcome"] == kind for t in tests) for kind in ("passed", "failure", "error", "skipped")
    }
    return {**counts, "tests": tests}


def crf_figures(crf: dict | None) -> list[dict]:
    """Per case and device: each contender's milliseconds, the speedups, the kernel launches."""
    if crf is None:
        return []
    keep = (
        "case",
        "device",
        "fwd_bwd_ms",
        "scan_fwd_bwd_ms",
        "ref_fwd_bwd_ms",
        "viterbi_ms",
        "scan_viterbi_ms",
        "ref_viterbi_ms",
        "fwd_bwd_speedup",
        "viterbi_speedup",
        "fwd_bwd_speedup_vs_scan",
        "viterbi_speedup_vs_scan",
        "launches_fwd_bwd",
        "scan_launches_fwd_bwd",
        "ref_launches_fwd_bwd",
        "launches_viterbi",
        "scan_launches_viterbi",
        "ref_launches_viterbi",
    )
    return [{k: row[k] for k in keep if k in row} for row in crf["rows"]]


def throughput_figures(throughput: dict | None) -> dict[str, dict]:
    """{"bf16 span": figures, ...} of each throughput run."""
    if throughput is None:
        return {}
    keep = (
        "device",
        "model",
        "samples_per_s",
        "real_tokens_per_s",
        "step_time_median_s",
        "peak_memory_bytes",
        "mfu",
        "achieved_tflops",
        "peak_tflops_per_device",
        "peak_source",
        "real_tokens_fraction",
        "batch_size",
        "max_seq_length",
        "measured_steps",
        "lengths_source",
    )
    runs = {f"{r['dtype']} {r['head']}": {k: r[k] for k in keep if k in r} for r in throughput["runs"]}
    for run in runs.values():
        run["peak_memory_gib"] = run.pop("peak_memory_bytes") / 2**30
    return runs


def projections(throughput: dict | None) -> dict:
    """Whole runs, from the measured bf16 rates and the windows/tokens per question of the sample's
    stores: the reference report's (windows at 384/128 over samples/s) and SpanBERT's recipe (real
    tokens at 512/128 over the real tokens/s measured at 384: it leaves out attention's growth with
    length, so it is an estimate from below)."""
    runs = throughput_figures(throughput)
    if not runs or "384" not in throughput["stores"]:
        return {}
    s384, s512 = throughput["stores"]["384"], throughput["stores"].get("512")
    windows_per_question = s384["windows"] / s384["examples"]
    found = {"windows_per_question_384": windows_per_question}
    if s512:
        found["real_tokens_per_question_512"] = s512["tokens"] / s512["examples"]
    for head in ("span", "crf"):
        run = runs.get(f"bf16 {head}")
        if run is None:
            continue
        windows = REFERENCE_RUN["questions"] * REFERENCE_RUN["epochs"] * windows_per_question
        minutes = windows / run["samples_per_s"] / 60
        found[f"reference_run_minutes_{head}"] = minutes
        found[f"reference_run_speedup_{head}"] = REFERENCE_RUN["minutes"][head] / minutes
        if s512:
            tokens = (
                SPANBERT_RECIPE["questions"]
                * SPANBERT_RECIPE["epochs"]
                * found["real_tokens_per_question_512"]
            )
            found[f"spanbert_recipe_minutes_{head}"] = tokens / run["real_tokens_per_s"] / 60
    return found


def goal_figures(crf_rows: list[dict], runs: dict[str, dict], projected: dict) -> dict[str, float | None]:
    main_cuda = next((r for r in crf_rows if r["device"] == "cuda" and r["case"] == "B32xT384xK3"), {})
    span, crf = runs.get("bf16 span"), runs.get("bf16 crf")
    overhead = crf["step_time_median_s"] / span["step_time_median_s"] - 1 if span and crf else None
    return {
        "mfu_bf16_span": span["mfu"] if span else None,
        "crf_fwd_bwd_vs_torch_scan": main_cuda.get("fwd_bwd_speedup_vs_scan"),
        "crf_fwd_bwd_vs_pytorch_crf": main_cuda.get("fwd_bwd_speedup"),
        "crf_head_step_overhead_bf16": overhead,
        "reference_run_minutes_span": projected.get("reference_run_minutes_span"),
        "reference_run_minutes_crf": projected.get("reference_run_minutes_crf"),
    }


def judge(measured: dict[str, float | None], dry_run: bool) -> dict[str, dict]:
    goals = {}
    for key, (what, op, target) in GOALS.items():
        value = measured.get(key)
        if dry_run or value is None:
            met = None
        else:
            met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        note = "dry run on CPU: not judged" if dry_run else "not measured" if value is None else None
        goals[key] = {"goal": what, "target": f"{op} {target}", "measured": value, "met": met, "note": note}
    return goals


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def build_summary(out: Path, steps: dict, scratch: Path) -> dict:
    crf_rows = crf_figures(read_json(out / "crf.json"))
    throughput = read_json(out / "throughput.json")
    runs, projected = throughput_figures(throughput), projections(throughput)
    measured = goal_figures(crf_rows, runs, projected)
    return {
        **steps,
        "environment": read_json(scratch / "env.json"),
        "goals": judge(measured, steps["dry_run"]),
        "pytest": pytest_results(scratch / "pytest.xml"),
        "crf": crf_rows,
        "throughput": runs,
        "throughput_skipped": (throughput or {}).get("skipped", []),
        "projections": projected,
        "stores": (throughput or {}).get("stores"),
        "demo": read_json(out / "demo.json"),
    }


def print_summary(summary: dict) -> None:
    env = summary["environment"] or {}
    gpu = env.get("gpu") or {}
    print(f"device: {gpu.get('name', env.get('device'))}, driver {gpu.get('driver')}")
    print(f"packages: {env.get('packages')}")
    for name, step in summary["steps"].items():
        print(f"  step {name:<12} {step['status']:<10} {step['seconds']:6.1f} s  {step['reason'] or ''}")
    for goal in summary["goals"].values():
        value = "-" if goal["measured"] is None else f"{goal['measured']:.3f}"
        verdict = {True: "met", False: "NOT met", None: goal["note"]}[goal["met"]]
        print(f"  goal {goal['goal']} {goal['target']}: {value} ({verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("environment").add_argument("out", type=Path)
    demo = sub.add_parser("demo")
    demo.add_argument("demo_dir", type=Path)
    demo.add_argument("out", type=Path)
    demo.add_argument("--wall_seconds", type=float, required=True)
    summary = sub.add_parser("summary")
    summary.add_argument("out", type=Path)
    summary.add_argument("--steps", type=Path, required=True)
    summary.add_argument("--scratch", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "environment":
        write(args.out, environment())
    elif args.command == "demo":
        write(args.out, demo_figures(args.demo_dir, args.wall_seconds))
    else:
        result = build_summary(args.out, json.loads(args.steps.read_text()), args.scratch)
        write(args.out / "summary.json", result)
        print_summary(result)
    return 0


def write(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
