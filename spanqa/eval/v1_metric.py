"""The SQuAD v1.1 metric (evaluate-v1.1.py) and the MRQA metric (mrqa_official_eval.py), figure for figure.

Both score each question by the best over its gold texts of exact match and token F1, with the answer
normalisation of every SQuAD script. Where they differ from the v2.0 script (spanqa.eval.squad_metric):
- no gold is dropped: a gold that normalises to "" (SQuAD v1.1 dev has three "." golds) is matched
  exactly by a prediction that normalises to "" too ("" or "."), with F1 0 (the F1 of the v1.1 script
  counts common tokens, and there are none);
- there are no unanswerable questions, no null odds and no threshold.
And from each other: evaluate-v1.1.py walks the file's questions (an id given twice counts twice);
mrqa_official_eval.py keys them by qid (an id given twice counts once, with its last answers). Both give
a question without a prediction 0 and count it. A question with no gold text at all crashes both
scripts (a max over nothing): here it is a one-line error naming the question.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from spanqa.data.formats import MRQA_METRIC, SQUAD_V1
from spanqa.errors import SpanqaError
from spanqa.eval.golds import GoldQuestion
from spanqa.eval.squad_metric import normalize_answer


def v1_exact(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def v1_f1(prediction: str, gold: str) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0  # also when both are empty: the official scripts never divide, they return 0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def scored_questions(golds: Iterable[GoldQuestion], metric: str) -> list[GoldQuestion]:
    """The questions a script sums over: v1.1 every question of the file, MRQA one per qid."""
    golds = list(golds)
    if metric == SQUAD_V1:
        return golds
    if metric != MRQA_METRIC:
        raise ValueError(f"not a max-over-golds metric: {metric!r}")
    by_id: dict[str, GoldQuestion] = {}
    for gold in golds:
        by_id[gold.id] = gold  # a dict, as the MRQA script's: first position, last answers
    return list(by_id.values())


def per_question(
    questions: list[GoldQuestion], predictions: Mapping[str, str], metric: str
) -> tuple[list[int], list[float]]:
    """EM and F1 of each question (max over its golds); 0 and 0 without a prediction."""
    exact, f1 = [], []
    for question in questions:
        if not question.answers:
            raise SpanqaError(
                f"question {question.id!r} has no gold answer: the {metric} script cannot score it "
                "(score data with unanswerable questions by --metric squad-v2.0)"
            )
        if question.id not in predictions:
            exact.append(0)
            f1.append(0.0)
            continue
        pred = normalize_answer(predictions[question.id])
        golds = {normalize_answer(g) for g in question.answers}  # each distinct text normalised once
        exact.append(max(int(pred == g) for g in golds))
        f1.append(max(_f1(pred.split(), g.split()) for g in golds))
    return exact, f1


def max_over_golds_scores(golds: Iterable[GoldQuestion], predictions: Mapping[str, str], metric: str) -> dict:
    """The official figures of `metric` (SQUAD_V1 or MRQA_METRIC) under spanqa's names: exact (the
    scripts' exact_match), f1, total; plus raw_exact (a gold text character for character) and
    missing_predictions when there are any."""
    questions = scored_questions(golds, metric)
    if not questions:
        raise SpanqaError("no questions to score")
    exact, f1 = per_question(questions, predictions, metric)
    total = len(questions)
    report = {"exact": 100.0 * sum(exact) / total, "f1": 100.0 * sum(f1) / total, "total": total}
    right = sum(q.id in predictions and predictions[q.id] in q.answers for q in questions)
    report["raw_exact"] = 100.0 * right / total
    missing = sum(q.id not in predictions for q in questions)
    if missing:
        report["missing_predictions"] = missing
    return report
