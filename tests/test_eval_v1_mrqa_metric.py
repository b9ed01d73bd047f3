"""The SQuAD v1.1 and MRQA metrics (spanqa.eval.v1_metric, spanqa.eval.scoring), by the rules of
evaluate-v1.1.py and mrqa_official_eval.py, with figures worked out by hand."""

from __future__ import annotations

import json

import pytest

from spanqa.cli import main as cli
from spanqa.data.convert import write_lines
from spanqa.errors import SpanqaError
from spanqa.eval.golds import GoldQuestion, read_golds
from spanqa.eval.scoring import per_question_scores, score_predictions, selection_score
from spanqa.eval.v1_metric import v1_exact, v1_f1

V1, MRQA = "squad-v1.1", "mrqa"


def test_a_gold_that_normalises_to_empty_is_matched_by_an_empty_prediction():
    # SQuAD v1.1 dev has three questions whose gold is "."; the v2.0 script would drop such a gold
    assert v1_exact("", ".") == v1_exact(".", ".") == v1_exact("the", ".") == 1
    assert v1_f1("", ".") == v1_f1(".", ".") == 0  # no common token: the v1.1 F1 is 0
    assert v1_exact("dot", ".") == 0
    golds = [GoldQuestion("dot", (".",)), GoldQuestion("a", ("Paris",))]
    for metric in (V1, MRQA):
        report = score_predictions(golds, {"dot": "", "a": "Paris"}, metric=metric)
        assert (report["exact"], report["f1"], report["total"]) == (100.0, 50.0, 2)
    # the v2.0 script instead scores "" against the empty gold: EM 1 and F1 1
    v2 = score_predictions(golds, {"dot": "", "a": "Paris"})
    assert (v2["exact"], v2["f1"]) == (100.0, 100.0)


def test_several_golds_take_the_best_of_each_figure():
    golds = [GoldQuestion("w", ("blue whale", "the great blue whale", "whale"))]
    # F1 against each gold: 1/2 ("blue whale"), 4/5 ("great blue whale": p 1, r 2/3), 2/3 ("whale")
    report = score_predictions(golds, {"w": "great whale"}, metric=MRQA)
    assert report["exact"] == 0 and report["f1"] == pytest.approx(80.0)
    report = score_predictions(golds, {"w": "Whale!"}, metric=V1)
    assert report["exact"] == 100.0 and report["raw_exact"] == 0.0  # raw: not a gold character for character


GOLDS = [
    GoldQuestion("q1", ("Paris",)),
    GoldQuestion("q2", ("Rome", "old Rome")),
    GoldQuestion("q3", ("1066",)),
]


def test_missing_ids_score_zero_and_unknown_ids_are_ignored():
    predictions = {"q1": "Paris", "q2": "Rome is old", "zzz": "ignored"}  # q3 has no prediction
    for metric in (V1, MRQA):
        report = score_predictions(GOLDS, predictions, metric=metric)
        # q2: F1 vs "old Rome" = 2 common of 3 predicted and 2 gold tokens: p 2/3, r 1 -> 0.8
        assert report["total"] == 3 and report["missing_predictions"] == 1
        assert report["exact"] == pytest.approx(100 / 3)
        assert report["f1"] == pytest.approx(100 * (1 + 0.8) / 3)
        assert report["metric"] == metric


def test_a_repeated_id_counts_twice_in_v1_and_once_with_its_last_answers_in_mrqa():
    golds = [GoldQuestion("q", ("Paris",)), GoldQuestion("x", ("Rome",)), GoldQuestion("q", ("Lyon",))]
    predictions = {"q": "Paris", "x": "Rome"}
    v1 = score_predictions(golds, predictions, metric=V1)
    assert v1["total"] == 3 and v1["exact"] == pytest.approx(200 / 3)  # q right once (Paris), wrong once
    mrqa = score_predictions(golds, predictions, metric=MRQA)
    assert mrqa["total"] == 2 and mrqa["exact"] == 50.0  # q's answers are the last ones: Lyon
    assert per_question_scores(golds, predictions, metric=MRQA).ids == ["q", "x"]  # first position kept


def test_a_question_without_golds_is_an_error_not_a_crash():
    with pytest.raises(SpanqaError, match="question 'none' has no gold answer: the squad-v1.1 script cannot"):
        score_predictions([GoldQuestion("none", ())], {"none": ""}, metric=V1)
    with pytest.raises(SpanqaError, match="--metric: must be one of"):
        score_predictions(GOLDS, {}, metric="bleu")


@pytest.mark.parametrize("metric", ["squad-v2.0", V1, MRQA])
def test_per_question_scores_average_to_the_report(metric):
    golds = GOLDS + [GoldQuestion("dot", (".",))]
    predictions = {"q1": "paris.", "q2": "old Rome is here", "dot": ".", "q3": "1066 AD"}
    report = score_predictions(golds, predictions, {q: -1.0 for q in predictions}, 0.0, metric)
    scores = per_question_scores(golds, predictions, {q: -1.0 for q in predictions}, 0.0, metric)
    assert scores.ids == ["q1", "q2", "q3", "dot"] and scores.has_answer.all()
    assert 100 * scores.exact.mean() == pytest.approx(report["exact"])
    assert 100 * scores.f1.mean() == pytest.approx(report["f1"])


def test_selection_falls_back_to_plain_figures_without_a_threshold_sweep():
    assert selection_score({"exact": 1.0, "f1": 2.0}, "best_f1") == 2.0
    assert selection_score({"exact": 1.0, "f1": 2.0, "best_f1": 3.0}, "best_f1") == 3.0
    assert selection_score({"exact": 1.0, "f1": 2.0}, "exact") == 1.0


def mrqa_dev(tmp_path):
    context = "Paris is the capital of France."
    qas = [
        # a detected span whose text is not the context's: the golds the scorer reads are still fine
        {"qid": "a", "question": "?", "answers": ["Paris", "City of Light"], "detected_answers": []},
        {
            "qid": "b",
            "question": "?",
            "answers": ["France"],
            "detected_answers": [{"text": "x", "char_spans": [[0, 3]]}],
        },
    ]
    return write_lines(
        tmp_path / "dev.jsonl.gz", [{"header": {"dataset": "T"}}, {"context": context, "qas": qas}]
    )


def test_read_golds_tells_the_scorer_by_format_and_version(tmp_path, tiny_squad_file, tiny_squad_v1_file):
    mrqa = read_golds(mrqa_dev(tmp_path))
    assert mrqa.metric == MRQA and mrqa.questions == [
        GoldQuestion("a", ("Paris", "City of Light")),
        GoldQuestion("b", ("France",)),
    ]
    assert read_golds(tiny_squad_file).metric == "squad-v2.0"
    assert read_golds(tiny_squad_v1_file).metric == V1
    assert json.loads(tiny_squad_v1_file.read_text())["version"] == "1.1"


def evaluate(capsys, *argv):
    code = cli(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_evaluate_an_mrqa_file_and_override_the_metric(tmp_path, capsys, tiny_squad_file):
    data = str(mrqa_dev(tmp_path))
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps({"a": "the City of Light", "b": "Italy"}))
    odds = tmp_path / "n.json"
    odds.write_text(json.dumps({"a": 0.0, "b": 0.0}))
    code, report, err = evaluate(
        capsys, "--data_file", data, "--predictions", str(preds), "--null_odds", str(odds)
    )
    assert code == 0 and report == {"exact": 50.0, "f1": 50.0, "total": 2, "raw_exact": 0.0, "metric": MRQA}
    assert "--null_odds: the mrqa script takes no null odds; ignored" in err
    code, report, _ = evaluate(
        capsys, "--data_file", data, "--predictions", str(preds), "--metric", "squad-v2.0"
    )
    assert code == 0 and report["metric"] == "squad-v2.0" and report["HasAns_total"] == 2
    # a SQuAD v2 file scored by the v1.1 script: its unanswerable questions cannot be scored
    code, _, err = evaluate(
        capsys, "--data_file", str(tiny_squad_file), "--predictions", str(preds), "--metric", V1
    )
    assert (
        code == 2
        and "has no gold answer: the squad-v1.1 script cannot score it" in err
        and err.splitlines()[-1].startswith("spanqa evaluate: error: ")
    )
