"""The SQuAD v2 metric against figures computed by hand from the official definition."""

from __future__ import annotations

import pytest

from spanqa.errors import SpanqaError
from spanqa.eval.squad_metric import (
    GoldQuestion,
    compute_exact,
    compute_f1,
    find_best_thresh,
    normalize_answer,
    null_odds_auc,
    squad_v2_scores,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Normans.", "normans"),
        ("A. B. C", "b c"),  # "a" is an article once its dot is gone
        ("an apple an", "apple"),
        ("theory of Anthem", "theory of anthem"),  # articles only as whole words
        ("l'amour", "lamour"),
        ("$1,000", "1000"),
        (" \t new\nyork  ", "new york"),
        ("Café—Déjà Vu!", "café—déjà vu"),  # non-ASCII punctuation (the em dash) stays
        ("“Quoted” the", "“quoted”"),
        ("ÄRZTE THE", "ärzte"),
        ("", ""),
        ("the a an", ""),
    ],
)
def test_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_and_f1_by_hand():
    assert compute_exact("the Normans", "Normans") == 1
    assert compute_exact("Normans", "Norman") == 0
    # gold {normans, of, france}, prediction {normans, in, france}: 2 shared, P = R = 2/3
    assert compute_f1("the Normans of France", "Normans in France") == pytest.approx(2 / 3)
    # tokens count per occurrence: gold [x, b, b], pred [b]: 1 shared, P 1, R 1/3 -> F1 0.5
    assert compute_f1("x b b", "b") == pytest.approx(2 * (1 / 3) / (4 / 3))
    assert compute_f1("", "") == 1
    assert compute_f1("", "something") == 0
    assert compute_f1("Paris", "the") == 0  # the prediction normalises to nothing


def test_several_golds_take_the_best():
    q = GoldQuestion("q", ("blue whale", "the great blue whale", "whale"))
    report = squad_v2_scores([q], {"q": "great whale"})
    # vs "whale": P 1/2, R 1 -> 2/3; vs "great blue whale": P 1, R 2/3 -> 0.8 (the max)
    assert report["exact"] == 0.0
    assert report["f1"] == pytest.approx(80.0)
    assert report["HasAns_total"] == 1 and "NoAns_total" not in report


def test_unanswerable_and_empty_golds():
    questions = [
        GoldQuestion("none", ()),  # unanswerable: the only gold is ""
        GoldQuestion("blank", ("the", ".")),  # golds that normalise to "" are dropped, leaving ""
    ]
    right = squad_v2_scores(questions, {"none": "", "blank": ""})
    assert (right["exact"], right["f1"]) == (100.0, 100.0)
    wrong = squad_v2_scores(questions, {"none": "Paris", "blank": "the Seine"})
    assert (wrong["exact"], wrong["f1"]) == (0.0, 0.0)
    # "blank" has answers, so it counts as answerable even though it scores like a no-answer
    assert (right["HasAns_total"], right["NoAns_total"]) == (1, 1)


QUESTIONS = [
    GoldQuestion("q1", ("Paris",)),
    GoldQuestion("q2", ()),
    GoldQuestion("q3", ("blue whale",)),
    GoldQuestion("q4", ()),
]
PREDICTIONS = {"q1": "Paris", "q2": "London", "q3": "whale", "q4": ""}
NULL_ODDS = {"q1": -2.0, "q2": 3.0, "q3": 1.0, "q4": 0.5}


def test_threshold_and_best_threshold_by_hand():
    report = squad_v2_scores(QUESTIONS, PREDICTIONS, NULL_ODDS)  # official default threshold 1.0
    # only q2 (odds 3 > 1) becomes "", which is right; q3 scores F1 2/3 (P 1, R 1/2), EM 0
    assert report["exact"] == 75.0
    assert report["f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert (report["HasAns_exact"], report["HasAns_f1"]) == (50.0, pytest.approx(100 * (5 / 3) / 2))
    assert (report["NoAns_exact"], report["NoAns_f1"], report["NoAns_total"]) == (100.0, 100.0, 2)
    # sweep from "all null" (2 right) in odds order q1 -2, q4 0.5, q3 1, q2 3:
    # EM: 3, 3, 3, 2 -> best 3 at -2;  F1: 3, 3, 3 2/3, 2 2/3 -> best 3 2/3 at 1.0
    assert (report["best_exact"], report["best_exact_thresh"]) == (75.0, -2.0)
    assert report["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4)
    assert report["best_f1_thresh"] == 1.0
    assert report["raw_exact"] == 75.0
    assert list(report)[:13] == [
        "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
        "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh",
    ]  # fmt: skip


def test_threshold_moves_answers_to_null():
    strict = squad_v2_scores(QUESTIONS, PREDICTIONS, NULL_ODDS, null_threshold=-10.0)
    # everything predicted "": the two unanswerable right, the two answerable wrong
    assert (strict["exact"], strict["f1"], strict["raw_exact"]) == (50.0, 50.0, 50.0)


def test_best_threshold_keeps_the_first_of_equal_scores():
    # q1's +1 and q2's -1 cancel: the sweep never beats its start, so the threshold stays 0.0
    has = {"q1": True, "q2": False}
    best, thresh = find_best_thresh({"q1": "a", "q2": "b"}, {"q1": 1, "q2": 0}, {"q2": -1.0, "q1": 5.0}, has)
    assert (best, thresh) == (50.0, 0.0)
    # a " " prediction is an answer to the sweep (raw truthiness), though it normalises to ""
    best, _ = find_best_thresh({"q1": "a", "q2": " "}, {"q1": 1, "q2": 1}, {"q1": 1.0, "q2": 2.0}, has)
    assert best == 100.0  # start 1, q1 +1 = 2 (best), q2 -1 = 1


def test_raw_exact_is_plain_string_equality():
    questions = [GoldQuestion("a", ("Normans",)), GoldQuestion("b", ("1,000",))]
    report = squad_v2_scores(questions, {"a": "the Normans", "b": "1,000"})
    assert report["exact"] == 100.0
    assert report["raw_exact"] == 50.0


def test_squad_v1_has_no_noans_figures():
    questions = [GoldQuestion("a", ("Denver Broncos",)), GoldQuestion("b", ("Santa Clara",))]
    report = squad_v2_scores(questions, {"a": "Broncos", "b": "Santa Clara, California"})
    assert report["total"] == 2 and report["HasAns_total"] == 2
    assert not any(k.startswith("NoAns") or k.startswith("best") for k in report)
    # a: P 1 R 1/2 -> 2/3; b: P 2/3 R 1 -> 0.8
    assert report["f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_missing_and_unknown_predictions():
    report = squad_v2_scores(QUESTIONS, {"q1": "Paris", "q4": "", "zzz": "ignored"})
    # q2 and q3 have no prediction: wrong, even q2 (unanswerable)
    assert report["exact"] == 50.0 and report["missing_predictions"] == 2
    assert report["total"] == 4


def test_null_odds_must_cover_predictions():
    with pytest.raises(SpanqaError, match=r'null odds: \$\["q3"\]: no value'):
        squad_v2_scores(QUESTIONS, PREDICTIONS, {"q1": 0.0, "q2": 0.0, "q4": 0.0})


def test_examples_from_the_data_pipeline_are_accepted():
    from spanqa.data.squad import Answer, Example

    example = Example("e", "t", "q?", "ctx", (Answer("ctx", 0),), False)
    assert squad_v2_scores([example], {"e": "ctx"})["exact"] == 100.0


def test_null_odds_auc_counts_pairs_ties_half():
    import itertools

    odds = {"a1": 0.5, "a2": -1.0, "a3": 2.0, "n1": 2.0, "n2": 0.5, "n3": 3.0, "n4": -2.0}
    questions = {q: GoldQuestion(q, ("x",) if q.startswith("a") else ()) for q in odds}
    pairs = [
        1.0 if odds[n] > odds[a] else 0.5 if odds[n] == odds[a] else 0.0
        for a, n in itertools.product(["a1", "a2", "a3"], ["n1", "n2", "n3", "n4"])
    ]
    assert null_odds_auc(questions, odds) == pytest.approx(sum(pairs) / len(pairs))
    assert null_odds_auc(questions, {q: -v for q, v in odds.items()}) == pytest.approx(1 - sum(pairs) / 12)
    with pytest.raises(SpanqaError, match="with and without an answer"):
        null_odds_auc({q: questions[q] for q in ("a1", "a2")}, odds)
