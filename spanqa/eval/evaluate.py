"""`spanqa evaluate`: score a predictions file with the official metric of its data file (any system's files).

    spanqa evaluate --data_file dev-v2.0.json --predictions predictions.json [--null_odds null_odds.json]
    spanqa evaluate --data_file TriviaQA-dev.jsonl.gz --predictions predictions.json

Each data file is scored by its own official script: SQuAD v2.0 (evaluate-v2.0.py, with the
best-threshold figures given null odds), SQuAD v1.1 (evaluate-v1.1.py; a file whose "version" is 1.x) and
MRQA (mrqa_official_eval.py; JSON lines, gzipped or not, told by content). `--metric` overrides the
choice. Prints every figure as one JSON object on stdout ("exact" is the v1.1/MRQA scripts'
"exact_match"); warnings (ids missing from or unknown to the data) go to stderr. Also the writer of the
prediction files that training leaves in OUTPUT_DIR/eval/ (and that `spanqa predict` writes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

from spanqa import io
from spanqa.data.formats import METRICS, SQUAD_V2
from spanqa.errors import SpanqaError
from spanqa.eval.golds import read_golds
from spanqa.eval.scoring import score_predictions
from spanqa.eval.squad_metric import check_null_odds_cover, validate_null_odds, validate_predictions
from spanqa.io import read_json

PREDICTIONS_FILE = "predictions.json"
NULL_ODDS_FILE = "null_odds.json"
REPORT_FILE = "eval_report.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spanqa evaluate",
        description="Score predictions like the official script of the data file (SQuAD v2.0, v1.1, MRQA).",
    )
    parser.add_argument("--data_file", required=True, help="SQuAD JSON or MRQA JSON lines with the golds")
    parser.add_argument("--predictions", required=True, help="JSON object {question id: answer text}")
    parser.add_argument(
        "--null_odds",
        help="JSON object {question id: no-answer score}; adds the best-threshold figures (SQuAD v2.0 only)",
    )
    parser.add_argument(
        "--null_threshold",
        type=float,
        default=math.inf,
        help="also answer '' where the null odds exceed this (the official --na-prob-thresh). Default: "
        "none, the predictions are scored as given; the official default 1.0 never changes a prediction "
        "for its probabilities in [0, 1], but spanqa's null odds are score differences",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        help="score by this script instead of the data file's own (its format and version say which)",
    )
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    gold_file = read_golds(args.data_file)
    metric = args.metric or gold_file.metric
    golds = gold_file.questions
    predictions = validate_predictions(read_json(args.predictions, "predictions file"), args.predictions)
    null_odds = None
    if args.null_odds and metric != SQUAD_V2:
        print(f"warning: --null_odds: the {metric} script takes no null odds; ignored", file=sys.stderr)
    elif args.null_odds:
        null_odds = validate_null_odds(read_json(args.null_odds, "null odds file"), args.null_odds)
    _warn_about_ids(golds, predictions, args.predictions)
    if null_odds is not None:
        check_null_odds_cover(null_odds, (g.id for g in golds), predictions, args.null_odds)
    report = score_predictions(golds, predictions, null_odds, args.null_threshold, metric)
    if args.out:
        try:
            io.write_json(Path(args.out), report)
        except OSError as err:
            raise SpanqaError(f"{args.out}: --out: cannot write ({err.strerror})") from None
    print(json.dumps(report, indent=2))
    return 0


def _warn_about_ids(golds: list, predictions: Mapping[str, str], source: str) -> None:
    known = {g.id for g in golds}
    missing = len(known - predictions.keys())
    unknown = len(predictions.keys() - known)
    if missing:
        print(
            f"warning: {source}: {missing} of {len(known)} questions have no prediction; scored as wrong",
            file=sys.stderr,
        )
    if unknown:
        print(
            f"warning: {source}: {unknown} ids are not questions of the data file; ignored", file=sys.stderr
        )


def write_prediction_files(
    out_dir: str | Path,
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float],
    report: Mapping,
) -> dict[str, Path]:
    """Write predictions.json, null_odds.json and eval_report.json into out_dir.

    The first two are in the formats the official scorer takes (`--pred_file`, `--na-prob-file`). Infinite
    null odds (a question with no valid span) are written as ±1e30 so that the files stay strict JSON.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        PREDICTIONS_FILE: dict(predictions),
        NULL_ODDS_FILE: finite_odds(null_odds),
        REPORT_FILE: dict(report),
    }
    return {name: io.write_json(out_dir / name, content, indent=1) for name, content in files.items()}


def finite_odds(null_odds: Mapping[str, float]) -> dict[str, float]:
    """Null odds as strict JSON: infinite odds (a question with no valid span) become ±1e30."""
    out = {}
    for qid, value in null_odds.items():
        value = float(value)
        if value != value:
            raise ValueError(f"null odds of {qid!r} is NaN")
        out[qid] = max(-1e30, min(1e30, value))
    return out
