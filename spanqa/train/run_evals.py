"""A training run's dev evaluation as MLflow holds it: its predictions and null odds, re-scored question
by question against the dev file it was evaluated on, for `spanqa compare`.

A run logs, when it closes, the files of its LAST evaluation (eval/predictions.json, eval/null_odds.json,
eval/eval_report.json) and, when it starts, its dev window store's meta.json (data/dev/meta.json: the dev
file's path, sha256 and official metric). Runs compare only when they were scored on the same dev file
(same sha256); the file itself is read from where the run found it, or from --data_file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spanqa.data.formats import SQUAD_V2
from spanqa.data.prepare import file_sha256
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.eval.golds import GoldFile, read_golds
from spanqa.eval.scoring import QuestionScores, per_question_scores
from spanqa.eval.squad_metric import normalize_answer, validate_null_odds, validate_predictions

EVAL_FILES = ("predictions.json", "null_odds.json", "eval_report.json")
DEV_META = "data/dev/meta.json"


@dataclass(frozen=True)
class RunEval:
    run_id: str
    name: str
    head: str | None
    seed: str | None
    step: int | None  # the optimizer step of the evaluation the files are from
    scores: QuestionScores
    answers: list[str | None]  # the answer as scored (after the null threshold), normalised; None: missing
    model: str  # the encoder (its tokenizer cuts the windows of the breakdowns)
    windows: WindowSettings

    @property
    def label(self) -> str:
        return self.name or self.run_id[:8]


def _download(client: Any, run_id: str, artifact: str, into: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, artifact, str(into)))
    except Exception:  # MlflowException / OSError: the run has no such artifact
        return None


def dev_source(client: Any, run: Any, work: Path) -> dict:
    """The run's dev data as its window store recorded it: {"path", "sha256", "metric", ...}."""
    meta = _download(client, run.info.run_id, DEV_META, work / run.info.run_id)
    if meta is None:
        raise SpanqaError(f"run {run.info.run_id}: logged no {DEV_META} (it had no dev set)")
    source = json.loads(meta.read_text()).get("source")
    if not isinstance(source, dict) or not {"path", "sha256"} <= source.keys():
        raise SpanqaError(f"run {run.info.run_id}: its {DEV_META} names no source file (path, sha256)")
    return source


def shared_golds(client: Any, runs: list, data_file: str | None, work: Path) -> GoldFile:
    """The dev file every run was evaluated on, read as its official scorer reads it."""
    sources = {run.info.run_id: dev_source(client, run, work) for run in runs}
    digests = {source["sha256"] for source in sources.values()}
    if len(digests) > 1:
        found = ", ".join(f"{rid[:8]}: {s['path']}" for rid, s in sources.items())
        raise SpanqaError(f"runs were evaluated on different dev files ({found}): nothing to pair")
    source = next(iter(sources.values()))
    path = Path(data_file) if data_file else Path(source["path"])
    flag = "--data_file" if data_file else "the runs' dev file"
    if not path.is_file():
        raise SpanqaError(f"{flag}: {path}: no such file (give the dev file with --data_file)")
    if file_sha256(path) != source["sha256"]:
        raise SpanqaError(f"{flag}: {path}: not the file the runs were evaluated on (sha256 differs)")
    golds = read_golds(path)
    if golds.metric != source.get("metric", SQUAD_V2):
        raise SpanqaError(f"{path}: scored by {golds.metric}, the runs by {source.get('metric')}")
    return golds


def load_run_eval(client: Any, run: Any, golds: GoldFile, work: Path) -> RunEval:
    """The run's last evaluation re-scored per question (it must agree with the run's own report)."""
    run_id, params = run.info.run_id, run.data.params
    files = {name: _download(client, run_id, f"eval/{name}", work / run_id) for name in EVAL_FILES}
    if files["predictions.json"] is None:
        raise SpanqaError(
            f"run {run_id}: logged no eval/predictions.json (it never evaluated, or has not closed)"
        )
    predictions = validate_predictions(json.loads(files["predictions.json"].read_text()), f"run {run_id}")
    odds = (
        validate_null_odds(json.loads(files["null_odds.json"].read_text()))
        if files["null_odds.json"]
        else None
    )
    report = json.loads(files["eval_report.json"].read_text()) if files["eval_report.json"] else {}
    threshold = null_threshold(params, report)
    scores = per_question_scores(golds.questions, predictions, odds, threshold, golds.metric)
    _check_against_report(run_id, scores, report)
    answers = [_scored_answer(q, predictions, odds, threshold) for q in scores.ids]
    return RunEval(
        run_id=run_id,
        name=run.info.run_name or "",
        head=params.get("config.head"),
        seed=params.get("config.seed"),
        step=report.get("step"),
        scores=scores,
        answers=answers,
        model=params.get("config.model", ""),
        windows=window_settings(run_id, params),
    )


def window_settings(run_id: str, params: dict) -> WindowSettings:
    """The windows the run cut its dev contexts into (its config params)."""
    values = {}
    for name in WindowSettings().as_dict():
        value = params.get(f"config.windows.{name}")
        if value == "null" and name in WindowSettings.ALTERNATIVES:  # the one of the pair not given
            values[name] = None
            continue
        if value is None or not value.isdigit():
            raise SpanqaError(
                f"run {run_id}: param config.windows.{name} is {value!r}, not a number of tokens"
            )
        values[name] = int(value)
    return WindowSettings(**values)


def null_threshold(params: dict, report: dict) -> float:
    """The threshold the run selected its logged answers with: the tuned one when it tuned one (its
    eval/predictions.json holds the exported model's answers), +inf when it never predicted "no answer"."""
    if params.get("config.answers.version_2_with_negative") in ("false", "False"):
        return math.inf
    if "tuned_threshold" in report:
        return float(report["tuned_threshold"])
    given = params.get("config.answers.null_score_diff_threshold", "null")
    return 0.0 if given == "null" else float(given)  # params are JSON text: None is "null"


def _scored_answer(qid: str, predictions: dict, odds: dict | None, threshold: float) -> str | None:
    if qid not in predictions:
        return None
    if odds is not None and odds.get(qid, -math.inf) > threshold:
        return ""
    return normalize_answer(predictions[qid])


def _check_against_report(run_id: str, scores: QuestionScores, report: dict) -> None:
    tuned = "tuned_" if "tuned_threshold" in report else ""  # the figures at the logged answers' threshold
    for name, values in (("exact", scores.exact), ("f1", scores.f1)):
        key = tuned + name
        if key in report and not math.isclose(100 * values.mean(), report[key], abs_tol=1e-6):
            raise SpanqaError(
                f"run {run_id}: its predictions score {key} {100 * values.mean():.4f} here but "
                f"{report[key]:.4f} in its eval_report.json (another dev file, or other golds?)"
            )
