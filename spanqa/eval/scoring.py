"""One entry to the three official metrics: each data file is scored by its own script.

    squad-v2.0  evaluate-v2.0.py   (spanqa.eval.squad_metric): HasAns/NoAns, null odds, best threshold
    squad-v1.1  evaluate-v1.1.py   (spanqa.eval.v1_metric): max over golds, every question of the file
    mrqa        mrqa_official_eval.py (spanqa.eval.v1_metric): max over golds, one question per qid

`read_golds` (spanqa.eval.golds) says which one a file wants; `spanqa evaluate --metric` overrides it.
`per_question_scores` gives the per-question figures whose mean (x100) is the report's EM and F1: what a
paired comparison of two runs resamples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spanqa.data.formats import METRICS, SQUAD_V2
from spanqa.errors import SpanqaError
from spanqa.eval import squad_metric, v1_metric


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise SpanqaError(f"--metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def score_predictions(
    golds: Iterable[Any],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
    null_threshold: float = 1.0,
    metric: str = SQUAD_V2,
) -> dict:
    """The figures of `metric` (see the module docstring), plus "metric": its name. The v1.1 and MRQA
    scripts take no null odds: predictions are scored as given."""
    if check_metric(metric) == SQUAD_V2:
        report = squad_metric.squad_v2_scores(golds, predictions, null_odds, null_threshold)
    else:
        report = v1_metric.max_over_golds_scores(squad_metric.as_gold_questions(golds), predictions, metric)
    return {**report, "metric": metric}


def selection_score(scores: Mapping[str, float], name: str) -> float:
    """The figure --eval_metric NAME picks the best checkpoint by. The v1.1 and MRQA scripts have no
    null threshold to sweep: there best_exact and best_f1 are exact and f1."""
    if name in scores:
        return scores[name]
    return scores[name.removeprefix("best_")]


@dataclass(frozen=True)
class QuestionScores:
    """Per question, in the order the scorer sums them: EM (0/1), F1 (0..1), and whether it has a gold."""

    ids: list[str]
    exact: np.ndarray  # float64
    f1: np.ndarray  # float64
    has_answer: np.ndarray  # bool


def per_question_scores(
    golds: Iterable[Any],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
    null_threshold: float = 1.0,
    metric: str = SQUAD_V2,
) -> QuestionScores:
    """What `score_predictions` averages: 100 x mean(exact) is its "exact", 100 x mean(f1) its "f1"."""
    questions = squad_metric.as_gold_questions(golds)
    if check_metric(metric) == SQUAD_V2:
        by_id = squad_metric.unique_by_id(questions)
        exact, f1 = squad_metric.thresholded_scores(by_id, predictions, null_odds, null_threshold)
        ids = list(by_id)
        exact_values, f1_values = [exact[q] for q in ids], [f1[q] for q in ids]
        has_answer = [by_id[q].has_answer for q in ids]
    else:
        scored = v1_metric.scored_questions(questions, metric)
        exact_values, f1_values = v1_metric.per_question(scored, predictions, metric)
        ids, has_answer = [q.id for q in scored], [q.has_answer for q in scored]
    return QuestionScores(
        ids,
        np.asarray(exact_values, np.float64),
        np.asarray(f1_values, np.float64),
        np.asarray(has_answer, bool),
    )
