"""The official SQuAD v2.0 metric (evaluate-v2.0.py), figure for figure, plus the reference report's raw EM.

Every choice that moves a digit follows the official scorer: the answer normalisation, gold answers that
normalise to "" are dropped (an unanswerable question's only gold is ""), sums run in the data file's
question order, and the best-threshold sweep walks the null odds in their own (stable-sorted) order,
starting from "predict no answer everywhere". Where the official script crashes (a question without a
prediction) we score the question as wrong instead and say how many there were.
"""

from __future__ import annotations

import bisect
import collections
import json
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

from spanqa.errors import SpanqaError
from spanqa.eval.golds import GoldQuestion, read_gold_questions  # noqa: F401 - imported from here too

# The figures a run can pick its best checkpoint by (higher is better).
SELECTION_METRICS = ("exact", "f1", "best_exact", "best_f1")

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)  # deletes exactly the official set
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    text = text.lower().translate(_DROP_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def get_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    return f1_of_tokens(get_tokens(gold), get_tokens(pred))


def f1_of_tokens(gold_tokens: list[str], pred_tokens: list[str]) -> float:
    if not gold_tokens or not pred_tokens:
        # a no-answer agrees only with a no-answer
        return int(gold_tokens == pred_tokens)
    num_same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def scoring_golds(answers: Iterable[str]) -> list[str]:
    """Gold texts that take part in EM/F1: those that normalise to something, else the empty answer."""
    return [a for a in answers if normalize_answer(a)] or [""]


def as_gold_questions(examples: Iterable[Any]) -> list[GoldQuestion]:
    """Accept GoldQuestion, spanqa.data.squad.Example (answers of `.text`) or SQuAD `qa` dicts.

    Leaderboard figures need the golds exactly as the data file gives them: where the training-side parser
    repaired or dropped answers (its validation report counts them), score `read_gold_questions(file)`.
    """
    golds = []
    for ex in examples:
        if isinstance(ex, GoldQuestion):
            golds.append(ex)
        elif isinstance(ex, Mapping):
            golds.append(GoldQuestion(str(ex["id"]), tuple(a["text"] for a in ex["answers"])))
        else:
            texts = tuple(a if isinstance(a, str) else a.text for a in ex.answers)
            golds.append(GoldQuestion(ex.id, texts))
    return golds


def squad_v2_scores(
    examples: Iterable[Any],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
    null_threshold: float = 1.0,
) -> dict:
    """The official figures (exact, f1, total, HasAns_*, NoAns_*, best_* given null odds) plus raw_exact.

    `predictions` maps question id to answer text ("" = no answer). A question whose null odds exceed
    `null_threshold` counts as answered "" (the official `--na-prob-thresh`, default 1.0). Questions
    without a prediction count as wrong (the count is `missing_predictions` when there are any);
    predictions for ids not in `examples` are ignored, as the official scorer does.
    """
    questions = unique_by_id(as_gold_questions(examples))
    if not questions:
        raise SpanqaError("no questions to score")
    has_answer = {qid: q.has_answer for qid, q in questions.items()}
    exact_raw, f1_raw = raw_scores(questions, predictions)
    odds = _predicted_odds(null_odds, exact_raw, predictions)
    exact = apply_no_answer_threshold(exact_raw, odds, has_answer, null_threshold)
    f1 = apply_no_answer_threshold(f1_raw, odds, has_answer, null_threshold)

    report = make_eval_dict(exact, f1)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, has in has_answer.items() if has == wanted]
        if qids:
            report.update({f"{prefix}_{k}": v for k, v in make_eval_dict(exact, f1, qids).items()})
    if null_odds is not None:
        best_exact, exact_thresh = find_best_thresh(predictions, exact_raw, odds, has_answer)
        best_f1, f1_thresh = find_best_thresh(predictions, f1_raw, odds, has_answer)
        report.update(
            best_exact=best_exact, best_exact_thresh=exact_thresh, best_f1=best_f1, best_f1_thresh=f1_thresh
        )
    report["raw_exact"] = raw_exact(questions, predictions, odds, null_threshold)
    missing = sum(1 for qid in questions if qid not in predictions)
    if missing:
        report["missing_predictions"] = missing
    return report


def _predicted_odds(
    null_odds: Mapping[str, float] | None, questions: Iterable[str], predictions: Mapping[str, str]
) -> dict[str, float]:
    odds = null_odds if null_odds is not None else {qid: 0.0 for qid in predictions}
    check_null_odds_cover(odds, questions, predictions)
    # a question without a prediction stays wrong whatever odds the file gives it
    return {qid: value for qid, value in odds.items() if qid in predictions}


def thresholded_scores(
    questions: Mapping[str, GoldQuestion],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None,
    null_threshold: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question EM and F1 after the null threshold: what the "exact" and "f1" figures average."""
    has_answer = {qid: q.has_answer for qid, q in questions.items()}
    exact_raw, f1_raw = raw_scores(questions, predictions)
    odds = _predicted_odds(null_odds, exact_raw, predictions)
    return (
        apply_no_answer_threshold(exact_raw, odds, has_answer, null_threshold),
        apply_no_answer_threshold(f1_raw, odds, has_answer, null_threshold),
    )


def raw_scores(
    questions: Mapping[str, GoldQuestion], predictions: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-question EM and F1 (max over golds) before any null threshold; a missing prediction scores 0."""
    exact, f1 = {}, {}
    for qid, question in questions.items():
        if qid not in predictions:
            exact[qid] = f1[qid] = 0
            continue
        # normalise each distinct text once; the figures are those of compute_exact/compute_f1
        pred = normalize_answer(predictions[qid])
        golds = {normalize_answer(g) for g in scoring_golds(question.answers)}
        exact[qid] = max(int(g == pred) for g in golds)
        f1[qid] = max(f1_of_tokens(g.split(), pred.split()) for g in golds)
    return exact, f1


def apply_no_answer_threshold(
    scores: Mapping[str, float],
    null_odds: Mapping[str, float],
    has_answer: Mapping[str, bool],
    threshold: float,
) -> dict[str, float]:
    """Scores after turning every prediction whose null odds exceed the threshold into the empty answer."""
    out = {}
    for qid, score in scores.items():
        predicts_null = qid in null_odds and null_odds[qid] > threshold
        out[qid] = float(not has_answer[qid]) if predicts_null else score
    return out


def make_eval_dict(
    exact: Mapping[str, float], f1: Mapping[str, float], qids: list[str] | None = None
) -> dict:
    if not qids:
        total = len(exact)
        return {
            "exact": 100.0 * sum(exact.values()) / total,
            "f1": 100.0 * sum(f1.values()) / total,
            "total": total,
        }
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[k] for k in qids) / total,
        "f1": 100.0 * sum(f1[k] for k in qids) / total,
        "total": total,
    }


def find_best_thresh(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    null_odds: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """The best score over null thresholds and the threshold that reaches it (the official sweep).

    Start below every odds value, where every question is answered "" and exactly the unanswerable ones
    are right; then raise the threshold past one question at a time in ascending (stable) odds order,
    keeping the first threshold that strictly improves the score. Questions without a prediction can never
    be right, so they are not counted in the starting score.
    """
    score = sum(1 for qid, has in has_answer.items() if not has and qid in predictions)
    best_score, best_thresh = score, 0.0
    for qid in sorted(null_odds, key=lambda k: null_odds[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            score += scores[qid]
        elif predictions[qid]:
            # raw truthiness, as in the official scorer: " " is an answer even though it normalises to ""
            score -= 1
        if score > best_score:
            best_score, best_thresh = score, null_odds[qid]
    return 100.0 * best_score / len(scores), best_thresh


def null_odds_auc(questions: Mapping[str, GoldQuestion], null_odds: Mapping[str, float]) -> float:
    """How well the null odds rank "no answer" (not a figure of the official script): the chance that an
    unanswerable question's odds exceed an answerable one's, ties counting half (the ROC AUC). 0.5 is a
    coin; best_f1 can only rise far above answering nothing when it is well above 0.5."""
    answerable = sorted(null_odds[q] for q, gold in questions.items() if gold.has_answer and q in null_odds)
    unanswerable = [null_odds[q] for q, gold in questions.items() if not gold.has_answer and q in null_odds]
    if not answerable or not unanswerable:
        raise SpanqaError("null_odds_auc needs scored questions with and without an answer")
    # answerable odds below each unanswerable one's, plus half of those equal to it: (left + right) / 2
    pairs = sum(bisect.bisect_left(answerable, x) + bisect.bisect_right(answerable, x) for x in unanswerable)
    return pairs / 2 / (len(answerable) * len(unanswerable))


def raw_exact(
    questions: Mapping[str, GoldQuestion],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float],
    threshold: float,
) -> float:
    """The reference report's EM: the (thresholded) prediction equals a gold text character for character."""
    right = 0
    for qid, question in questions.items():
        if qid not in predictions:
            continue
        pred = "" if qid in null_odds and null_odds[qid] > threshold else predictions[qid]
        right += pred in (question.answers or ("",))
    return 100.0 * right / len(questions)


def validate_predictions(predictions: Any, source: str = "predictions") -> dict[str, str]:
    if not isinstance(predictions, dict):
        raise SpanqaError(f"{source}: $: expected a JSON object {{question id: answer text}}")
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise SpanqaError(
                f"{source}: $[{json.dumps(qid)}]: expected an answer string, got {_kind(answer)}"
            )
    return predictions


def validate_null_odds(null_odds: Any, source: str = "null odds") -> dict[str, float]:
    if not isinstance(null_odds, dict):
        raise SpanqaError(f"{source}: $: expected a JSON object {{question id: number}}")
    for qid, value in null_odds.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpanqaError(f"{source}: $[{json.dumps(qid)}]: expected a number, got {_kind(value)}")
        if value != value:  # NaN orders with nothing: the best-threshold search would silently go wrong
            raise SpanqaError(f"{source}: $[{json.dumps(qid)}]: NaN is not a score (give a number)")
    return null_odds


def check_null_odds_cover(
    null_odds: Mapping[str, float],
    questions: Iterable[str],
    predictions: Mapping[str, str],
    source: str = "null odds",
) -> None:
    """Every predicted question needs null odds (the official scorer raises KeyError); name the first gap."""
    for qid in questions:
        if qid in predictions and qid not in null_odds:
            raise SpanqaError(
                f"{source}: $[{json.dumps(qid)}]: no value for a question that has a prediction"
            )


def unique_by_id(golds: list[GoldQuestion]) -> dict[str, GoldQuestion]:
    # like the official dicts: a repeated id keeps its first position and its last answers
    questions: dict[str, GoldQuestion] = {}
    for gold in golds:
        questions[gold.id] = gold
    return questions


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
