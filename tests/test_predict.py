"""`spanqa predict` on models exported from a tiny random BERT, with both heads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from spanqa.cli import main as cli_main
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.eval.postprocess import AnswerSettings
from spanqa.export import ExportInfo
from spanqa.predict import Question, predict, read_questions

# Small windows so that a paragraph of a few sentences already needs several of them.
WINDOWS = WindowSettings(max_seq_length=64, doc_overlap=16, max_query_length=16)
ANSWERS = AnswerSettings(max_answer_length=8, n_best_size=10, null_score_diff_threshold=0.0)
SHORT_CONTEXT = "The tower was designed by Gustave Eiffel and finished in 1889 for the World Fair in Paris."
LONG_CONTEXT = " ".join(
    f"In year {1800 + i} the council of town number {i} met {i % 7} times and planted {3 * i} trees."
    for i in range(12)
)
QUESTIONS = [
    Question("q-short", "Who designed the tower?", SHORT_CONTEXT),
    Question("q-long", "How many trees were planted by town number 9?", LONG_CONTEXT),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer

    from spanqa.export import export_model
    from spanqa.model.build import build_model
    from spanqa.testing import tiny_bert_dir

    root = tmp_path_factory.mktemp("models")
    tiny = tiny_bert_dir(root / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    dirs = {}
    for head in ("span", "crf"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the heads start random: fixed, so that every run tests the same model
            model = build_model(str(tiny), head)
        export_model(model, tokenizer, root / head, ExportInfo(head, WINDOWS, ANSWERS))
        dirs[head] = root / head
    return dirs


def loaded(model_dir: Path):
    from spanqa.export import load_export

    return load_export(model_dir)


def with_answers(info: ExportInfo, **changes) -> ExportInfo:
    return dataclasses.replace(info, answers=dataclasses.replace(info.answers, **changes))


def reference_span_answers(model_dir: Path, questions: list[Question], max_answer_length: int) -> dict:
    """Best non-null span per question, straight from transformers: the tokenizer's own overflowing pair
    windows, AutoModelForQuestionAnswering logits and a brute-force search over context spans."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
    answers = {}
    for q in questions:
        enc = tokenizer(
            q.question,
            q.context,
            truncation="only_second",
            max_length=WINDOWS.max_seq_length,
            stride=WINDOWS.doc_overlap,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                token_type_ids=enc["token_type_ids"],
            )
        best = (-np.inf, "", 0)
        for w in range(len(enc["input_ids"])):
            context = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
            start, end = out.start_logits[w].numpy(), out.end_logits[w].numpy()
            for s in context:
                for e in context:
                    if s <= e < s + max_answer_length and start[s] + end[e] > best[0]:
                        offsets = enc["offset_mapping"][w]
                        best = (float(start[s] + end[e]), q.context[offsets[s][0] : offsets[e][1]], w)
        answers[q.id] = {"score": best[0], "answer": best[1], "windows": len(enc["input_ids"])}
    return answers


def test_span_head_matches_transformers_reference(exported):
    model, tokenizer, settings = loaded(exported["span"])
    no_null = with_answers(settings, null_score_diff_threshold=float("inf"))
    got = predict(model, tokenizer, QUESTIONS, no_null, batch_size=3)
    want = reference_span_answers(exported["span"], QUESTIONS, ANSWERS.max_answer_length)
    assert got["q-short"].windows == 1
    assert got["q-long"].windows == want["q-long"]["windows"] > 2
    for q in QUESTIONS:
        assert got[q.id].answer == want[q.id]["answer"]
        assert got[q.id].score == pytest.approx(want[q.id]["score"], abs=1e-4)


@pytest.mark.parametrize("head", ["span", "crf"])
def test_null_threshold_decides_between_answer_and_no_answer(exported, head):
    model, tokenizer, settings = loaded(exported[head])
    always = predict(
        model, tokenizer, QUESTIONS, with_answers(settings, null_score_diff_threshold=float("inf"))
    )
    never = predict(
        model, tokenizer, QUESTIONS, with_answers(settings, null_score_diff_threshold=float("-inf"))
    )
    for q in QUESTIONS:
        p = always[q.id]
        assert p.answer and p.answer in q.context
        assert np.isfinite(p.score) and np.isfinite(p.null_odds)
        assert never[q.id].answer == ""
        assert never[q.id].null_odds == pytest.approx(p.null_odds)
    if head == "crf":
        # log-probabilities of a span and of the all-O tagging
        assert all(always[q.id].score <= 0 for q in QUESTIONS)


@pytest.mark.parametrize("head", ["span", "crf"])
def test_question_and_input_file_forms_agree(exported, head, tmp_path, capsys):
    model_dir = str(exported[head])
    short, long = QUESTIONS
    assert (
        cli_main(["predict", "--model", model_dir, "--question", long.question, "--context", long.context])
        == 0
    )
    single = json.loads(capsys.readouterr().out)
    assert set(single) == {"answer", "score", "null_odds"}

    jsonl = tmp_path / "questions.jsonl"
    jsonl.write_text("\n".join(json.dumps(q.__dict__) for q in QUESTIONS) + "\n")
    squad = tmp_path / "questions.json"
    paragraphs = [{"context": q.context, "qas": [{"id": q.id, "question": q.question}]} for q in QUESTIONS]
    squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    outputs = {}
    for source in (jsonl, squad):
        out = tmp_path / source.suffix[1:] / "predictions.json"
        details = tmp_path / source.suffix[1:] / "details.json"
        args = ["predict", "--model", model_dir, "--input", source, "--output", out, "--details", details]
        assert cli_main([str(a) for a in [*args, "--batch_size", "2"]]) == 0
        odds = json.loads((out.parent / "null_odds.json").read_text())  # beside --output by default
        outputs[source.suffix] = (json.loads(out.read_text()), odds, json.loads(details.read_text()))
    assert outputs[".jsonl"] == outputs[".json"]
    predictions, odds, details = outputs[".json"]
    assert set(predictions) == set(odds) == {"q-short", "q-long"}
    # the official formats: id -> answer text, id -> number; the details hold the records
    assert all(isinstance(v, str) for v in predictions.values()) and all(
        isinstance(v, float) for v in odds.values()
    )
    assert {k: v for k, v in details["q-long"].items() if k != "windows"} == single
    assert predictions["q-long"] == single["answer"] and odds["q-long"] == pytest.approx(single["null_odds"])


def test_read_questions_accepts_lists_and_default_ids(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(
        json.dumps([{"question": "Q1?", "context": "C one."}, {"id": 7, "question": "Q2?", "context": "C"}])
    )
    assert [q.id for q in read_questions(path)] == ["0", "7"]
    lines = tmp_path / "q.jsonl"
    lines.write_text(
        '{"question": "Q?", "context": "C."}\n\n{"id": "b", "question": "R?", "context": "D."}\n'
    )
    assert [q.id for q in read_questions(lines)] == ["line1", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"id": "a", "question": "Q?", "context": "C."}\n{"id": "b", "question": "Q?"',
            "line 2: not valid JSON",
        ),
        ('{"id": "a", "question": "Q?"}\n', "line 1.context: expected a string, found missing"),
        ('{"id": "a", "question": " ", "context": "C."}\n', "line 1.question: empty"),
        (
            '{"id": "a", "question": "Q?", "context": "C."}\n'
            '{"id": "a", "question": "R?", "context": "D."}\n',
            "duplicate",
        ),
        ('{"data": [{"paragraphs": [{"context": "C.", "qas": [{"question": "Q?"}]}]}]}', "qas[0].id"),
        ("", "empty file"),
    ],
)
def test_bad_input_files_name_what_and_where(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SpanqaError) as err:
        read_questions(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--question", "Q?"], "--context: needed with --question"),
        ([], "nothing to answer"),
        (["--input", "x.jsonl", "--question", "Q?"], "not both"),
        (["--input", "missing.jsonl"], "missing.jsonl: no such questions file"),
        (["--question", "Q?", "--context", "C.", "--batch_size", "0"], "--batch_size"),
    ],
)
def test_bad_flags_are_one_line_errors(exported, tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["predict", "--model", str(exported["span"]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spanqa predict: error: ") and message in err
    assert "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_directory(tmp_path, capsys):
    assert cli_main(["predict", "--model", str(tmp_path), "--question", "Q?", "--context", "C."]) == 2
    assert "spanqa_config.json: missing" in capsys.readouterr().err


def test_a_model_trained_without_negatives_always_answers(exported):
    model, tokenizer, settings = loaded(exported["span"])
    v1 = with_answers(settings, version_2_with_negative=False, null_score_diff_threshold=float("-inf"))
    assert all(p.answer for p in predict(model, tokenizer, QUESTIONS, v1).values())


def test_the_readmes_predict_then_evaluate_recipe_runs_as_written(exported, tmp_path, monkeypatch, capsys):
    """The README's `spanqa predict` / `spanqa evaluate` lines, run in order with its own flags (the model
    and data paths pointed at a tiny export and a real SQuAD v2 file): evaluate accepts what predict wrote,
    and scores what predict answered."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    fixture = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
    paths = {"runs/spanbert-span/best_model": str(exported["span"]), "dev-v2.0.json": str(fixture)}
    # the recipe's lines: those on its model and its data file (the MRQA section has its own)
    lines = [
        line
        for line in re.findall(r"^spanqa (?:predict|evaluate) .*$", readme, flags=re.M)
        if set(shlex.split(line)) & set(paths)
    ]
    assert [shlex.split(line)[1] for line in lines] == ["predict", "predict", "evaluate"]
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in lines:
        argv = [paths.get(word, word) for word in shlex.split(line)[1:]]
        assert cli_main(argv) == 0, line
        outputs.append(capsys.readouterr().out)
    report = json.loads(outputs[-1])
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    answered = sum(1 for v in predictions.values() if v)
    assert report["total"] == len(predictions) > 0 and "best_f1" in report
    assert answered > 0  # the tiny random model answers some: evaluate scored predict's own answers
