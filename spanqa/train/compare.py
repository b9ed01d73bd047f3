"""`spanqa compare`: MLflow runs side by side, and whether their differences are real.

    spanqa compare heads-2026-11 [--out DIR] [--resamples 10000] [--seed 0] [--json]   # runs tagged TAG
    spanqa compare --runs RUN_ID RUN_ID ... [--data_file dev-v2.0.json]              # these runs

First the runs side by side: scores are those of the evaluation the run kept its best model at (the step
where its --eval_metric peaked), so they describe the exported model; a run without evaluations shows
"-". Train time is the `train_seconds` metric when the trainer logged one, else the run's wall time;
samples/s is the mean of the logged training throughput.

Then, from the predictions and null odds each run logged (those of its LAST evaluation), re-scored per
question on the dev file (spanqa.train.run_evals): for every pair, the difference in EM and F1 (all,
HasAns, NoAns) with a paired bootstrap 95% interval and p-value (spanqa.eval.bootstrap), the share of
questions both answer alike, and each run's breakdowns by question word, answer length, windows and
answerability (spanqa.eval.breakdown). Runs of one TAG are grouped by head: several seeds per head give
mean ± std and a bootstrap of the per-question seed means (spanqa.train.comparison). compare.json,
compare.txt and breakdown.png go to --out DIR and to every compared run's MLflow artifacts
(compare/NAME/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spanqa import io
from spanqa.errors import SpanqaError
from spanqa.train.tracking import DEFAULT_TRACKING_URI, bounded_http, one_line

TAG_KEY = "spanqa.tag"
SCORES = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1")
ROWS = (  # (label, RunSummary field, format)
    ("run", "name", "{}"),
    ("run id", "run_id", "{:.8}"),
    ("status", "status", "{}"),
    ("head", "head", "{}"),
    ("best by", "eval_metric", "{}"),
    ("at step", "best_step", "{}"),
    ("EM", "exact", "{:.2f}"),
    ("F1", "f1", "{:.2f}"),
    ("HasAns F1", "HasAns_f1", "{:.2f}"),
    ("NoAns F1", "NoAns_f1", "{:.2f}"),
    ("best F1", "best_f1", "{:.2f}"),
    ("train time", "train_seconds", "duration"),
    ("samples/s", "samples_per_s", "{:.1f}"),
)


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    head: str | None
    eval_metric: str
    best_step: int | None
    exact: float | None
    f1: float | None
    HasAns_f1: float | None  # noqa: N815 - the official SQuAD v2 metric name
    NoAns_f1: float | None  # noqa: N815
    best_f1: float | None
    train_seconds: float | None
    samples_per_s: float | None


def find_runs(client: Any, tag: str, experiment: str | None = None) -> list:
    """Active runs with tag spanqa.tag == `tag`, in `experiment` (by name) or in every experiment."""
    if "'" in tag:
        raise SpanqaError(f"TAG: {tag!r}: quotes are not allowed in a tag")
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise SpanqaError(f"--experiment: no MLflow experiment named {experiment!r}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`{TAG_KEY}` = '{tag}'", max_results=1000)
    return sorted(runs, key=lambda r: (run_head(r) or "", r.info.start_time or 0))


def run_head(run: Any) -> str | None:
    params, tags = run.data.params, run.data.tags
    return params.get("config.head") or params.get("head") or tags.get("spanqa.head")


def summarize(client: Any, run: Any) -> RunSummary:
    params, metrics = run.data.params, run.data.metrics
    eval_metric = params.get("config.eval_metric", "f1")
    best_step, scores = best_evaluation(client, run.info.run_id, eval_metric)
    if best_step is None:  # no history of the chosen metric: fall back to the latest values
        scores = {key: metrics.get(key) for key in SCORES}
    return RunSummary(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        head=run_head(run),
        eval_metric=eval_metric,
        best_step=best_step,
        **{key: scores.get(key) for key in SCORES},
        train_seconds=metrics.get("train_seconds", wall_seconds(run)),
        samples_per_s=mean_of_history(client, run.info.run_id, "samples_per_s"),
    )


def best_evaluation(client: Any, run_id: str, eval_metric: str) -> tuple[int | None, dict[str, float]]:
    """The step where `eval_metric` peaked (first one on ties) and every score logged at that step."""
    # v1.1 and MRQA dev files have no best_* figures: the run picked by exact/f1 (selection_score)
    history = client.get_metric_history(run_id, eval_metric) or client.get_metric_history(
        run_id, eval_metric.removeprefix("best_")
    )
    if not history:
        return None, {}
    best = max(history, key=lambda m: (m.value, -m.step))
    scores = {}
    for key in SCORES:
        at_step = [m.value for m in client.get_metric_history(run_id, key) if m.step == best.step]
        scores[key] = at_step[-1] if at_step else None
    return best.step, scores


def mean_of_history(client: Any, run_id: str, key: str) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, key)]
    return sum(values) / len(values) if values else None


def wall_seconds(run: Any) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000 if start and end else None


def format_table(summaries: list[RunSummary]) -> str:
    """Runs as columns, one row per figure: the layout of the reference report's comparison."""
    cells = [[label] + [_cell(getattr(s, field), fmt) for s in summaries] for label, field, fmt in ROWS]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        values = [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *values]).rstrip())
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    if fmt == "duration":
        seconds = round(float(value))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return fmt.format(value)


def make_client(tracking_uri: str | None) -> tuple[Any, str]:
    """An MlflowClient for the URI (flag, env, or ./mlflow.db), refusing to create an empty SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise SpanqaError(
                f"--tracking_uri: no MLflow store at {db} (train first, or point --tracking_uri / "
                "MLFLOW_TRACKING_URI at the store the runs were logged to)"
            )
    with bounded_http():
        from mlflow import MlflowClient

        try:
            return MlflowClient(tracking_uri=uri), uri
        except Exception as err:  # an unknown scheme: MlflowException, or KeyError from the registry
            raise SpanqaError(
                f"--tracking_uri: {uri!r} is not an MLflow store MLflow can open ({one_line(err)})"
            ) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spanqa compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "tag", metavar="TAG", nargs="?", help="value of the spanqa.tag run tag (train --tag TAG)"
    )
    parser.add_argument(
        "--runs", nargs="+", metavar="RUN_ID", help="compare these MLflow runs instead of a TAG"
    )
    parser.add_argument(
        "--tracking_uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    parser.add_argument("--experiment", help="only this MLflow experiment (default: all of them)")
    parser.add_argument("--out", help="also write compare.json, compare.txt and breakdown.png here")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    parser.add_argument(
        "--data_file", help="the dev file the runs were scored on (default: where they read it)"
    )
    parser.add_argument("--tokenizer", help="tokenizer for the breakdowns (default: each run's --model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    if (args.tag is None) == (args.runs is None):
        raise SpanqaError("TAG, --runs: give a TAG or --runs RUN_ID RUN_ID ..., not both or neither")
    if args.resamples < 1:
        raise SpanqaError(f"--resamples: must be at least 1, got {args.resamples}")
    return args


def read_runs(client: Any, uri: str, args: argparse.Namespace) -> tuple[list, list[RunSummary]]:
    """The runs (TAG's or --runs') and their summaries."""
    try:
        with bounded_http():
            if args.tag is not None:
                runs = find_runs(client, args.tag, args.experiment)
            else:
                runs = [_get_run(client, run_id) for run_id in args.runs]
            return runs, [summarize(client, run) for run in runs]
    except SpanqaError:
        raise
    except Exception as err:  # MlflowException, connection errors: one line, not a traceback
        raise SpanqaError(f"--tracking_uri: cannot read runs from {uri}: {one_line(err)}") from None


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise SpanqaError(f"--runs: no MLflow run {run_id!r}") from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    client, uri = make_client(args.tracking_uri)
    runs, summaries = read_runs(client, uri, args)
    if not summaries:
        where = f"experiment {args.experiment!r}" if args.experiment else "any experiment"
        raise SpanqaError(f"TAG: no MLflow run has tag {TAG_KEY} = {args.tag!r} in {where} at {uri}")
    title = f"runs tagged {TAG_KEY} = {args.tag!r} at {uri}" if args.tag else f"runs at {uri}"
    text = f"{title}\n{format_table(summaries)}"
    comparison = None
    if len(runs) > 1:
        comparison, paired_text = paired_or_reason(client, runs, args)
        text += f"\n\n{paired_text}"
    print(
        json.dumps({"runs": [asdict(s) for s in summaries], "comparison": comparison}) if args.json else text
    )
    if comparison is not None:
        write_outputs(
            client, runs, args, {"runs": [asdict(s) for s in summaries], "comparison": comparison}, text
        )
    return 0


def paired_or_reason(client: Any, runs: list, args: argparse.Namespace) -> tuple[dict | None, str]:
    """The paired comparison and its text; for a TAG whose runs cannot be paired (no predictions logged),
    None and the reason (for --runs, the reason is an error)."""
    from spanqa.train.compare_paired import paired_comparison

    try:
        return paired_comparison(client, runs, args)
    except SpanqaError as err:
        if args.runs is not None:
            raise
        print(f"spanqa compare: no paired comparison: {err}", file=sys.stderr)
        return None, f"no paired comparison: {err}"


def write_outputs(client: Any, runs: list, args: argparse.Namespace, content: dict, text: str) -> None:
    """compare.json, compare.txt and breakdown.png into --out and into each run's artifacts."""
    from spanqa.eval.breakdown import plot_breakdowns

    name = args.tag or "runs-" + "-".join(run.info.run_id[:8] for run in runs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = [
            io.write_json(out / "compare.json", content),
            io.write_text(out / "compare.txt", text + "\n"),
            plot_breakdowns(content["comparison"]["breakdowns"], out / "breakdown.png"),
        ]
        with bounded_http():
            for run in runs:
                for file in files:
                    client.log_artifact(run.info.run_id, str(file), f"compare/{name}")
    where = f"{args.out} and " if args.out else ""
    print(f"spanqa compare: wrote {where}compare/{name}/ of {len(runs)} MLflow runs", file=sys.stderr)
