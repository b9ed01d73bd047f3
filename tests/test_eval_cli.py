"""`spanqa evaluate` on good and bad files, and the prediction files that training writes."""

from __future__ import annotations

import json

import pytest

from spanqa.cli import main as cli
from spanqa.eval.evaluate import write_prediction_files

DATA = {
    "version": "v2.0",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Paris is on the Seine. The blue whale is large.",
                    "qas": [
                        {"id": "q1", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]},
                        {"id": "q2", "question": "?", "answers": [], "is_impossible": True},
                        {
                            "id": "q3",
                            "question": "?",
                            "answers": [{"text": "blue whale", "answer_start": 27}],
                        },
                        {"id": "q4", "question": "?", "answers": [], "is_impossible": True},
                    ],
                }
            ],
        }
    ],
}
PREDICTIONS = {"q1": "Paris", "q2": "London", "q3": "whale", "q4": ""}
NULL_ODDS = {"q1": -2.0, "q2": 3.0, "q3": 1.0, "q4": 0.5}


@pytest.fixture
def files(tmp_path):
    def write(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    return write


def run(capsys, *argv):
    code = cli(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_a_predictions_file(files, capsys, tmp_path):
    data, preds, odds = files("dev.json", DATA), files("p.json", PREDICTIONS), files("n.json", NULL_ODDS)
    out_file = tmp_path / "report.json"
    code, out, err = run(
        capsys, "--data_file", data, "--predictions", preds, "--null_odds", odds, "--out", str(out_file)
    )
    assert code == 0 and err == ""
    report = json.loads(out)  # one JSON object
    # by default the predictions are scored as given: q2's "London" is wrong
    assert (report["exact"], report["total"], report["best_exact_thresh"], report["best_f1_thresh"]) == (
        50.0,
        4,
        -2.0,
        1.0,
    )
    assert json.loads(out_file.read_text()) == report
    code, out, _ = run(
        capsys, "--data_file", data, "--predictions", preds, "--null_odds", odds, "--null_threshold", "1"
    )
    assert json.loads(out)["exact"] == 75.0  # the official script's --na-prob-thresh: q2's odds 3 > 1, so ""
    code, out, _ = run(capsys, "--data_file", data, "--predictions", preds, "--null_threshold", "-5")
    assert json.loads(out)["exact"] == 50.0  # no null odds file: every odds is 0.0 > -5, all answered ""
    assert "best_f1" not in json.loads(out)


def test_missing_and_unknown_ids_are_counted(files, capsys):
    preds = files("p.json", {"q1": "Paris", "q4": "", "other": "x"})
    code, out, err = run(capsys, "--data_file", files("dev.json", DATA), "--predictions", preds)
    assert code == 0
    assert json.loads(out)["missing_predictions"] == 2
    assert "2 of 4 questions have no prediction; scored as wrong" in err
    assert "1 ids are not questions of the data file; ignored" in err


@pytest.mark.parametrize(
    ("preds", "odds", "message"),
    [
        ("{not json", None, "p.json: not valid JSON"),
        (["Paris"], None, "p.json: $: expected a JSON object"),
        ({"q1": 3}, None, 'p.json: $["q1"]: expected an answer string, got int'),
        ({"q1": None}, None, 'p.json: $["q1"]: expected an answer string, got null'),
        (PREDICTIONS, {"q1": "high"}, 'n.json: $["q1"]: expected a number, got str'),
        (PREDICTIONS, {"q1": True}, 'n.json: $["q1"]: expected a number, got bool'),
        (PREDICTIONS, {"q1": 0.0}, 'n.json: $["q2"]: no value for a question that has a prediction'),
        (PREDICTIONS, [], "n.json: $: expected a JSON object"),
    ],
)
def test_bad_files_get_one_line_errors(files, capsys, preds, odds, message):
    argv = ["--data_file", files("dev.json", DATA), "--predictions", files("p.json", preds)]
    if odds is not None:
        argv += ["--null_odds", files("n.json", odds)]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("spanqa evaluate: error: ") and err.count("\n") == 1
    assert message in err


def test_bad_data_file_and_missing_files(files, capsys, tmp_path):
    preds = files("p.json", PREDICTIONS)
    bad = {"data": [{"paragraphs": [{"context": "C.", "qas": [{"id": "q1", "answers": [{"text": 5}]}]}]}]}
    code, _, err = run(capsys, "--data_file", files("bad.json", bad), "--predictions", preds)
    assert code == 2 and "bad.json: data[0].paragraphs[0].qas[0].answers[0].text: must be a string" in err
    code, _, err = run(capsys, "--data_file", str(tmp_path / "absent.json"), "--predictions", preds)
    assert code == 2 and "absent.json: no such data file" in err and err.count("\n") == 1
    data, out = files("dev.json", DATA), str(tmp_path / "no" / "such" / "dir" / "r.json")
    code, _, err = run(capsys, "--data_file", data, "--predictions", preds, "--out", out)
    assert code == 2 and "r.json: --out: cannot write" in err and err.count("\n") == 1


def test_written_files_are_what_the_official_scorer_reads(files, capsys, tmp_path):
    written = write_prediction_files(
        tmp_path / "eval",
        PREDICTIONS,
        {**NULL_ODDS, "q4": float("inf")},
        {"exact": 75.0},
    )
    assert sorted(written) == ["eval_report.json", "null_odds.json", "predictions.json"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(written)  # no temp files left
    assert json.loads((tmp_path / "eval" / "null_odds.json").read_text())["q4"] == 1e30  # strict JSON
    code, out, _ = run(
        capsys,
        "--data_file", files("dev.json", DATA),
        "--predictions", str(written["predictions.json"]),
        "--null_odds", str(written["null_odds.json"]), "--null_threshold", "1",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["exact"] == 75.0
