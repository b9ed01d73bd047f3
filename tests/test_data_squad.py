"""SQuAD parsing and answer validation (spanqa.data.squad)."""

from __future__ import annotations

import copy
import json

import pytest

from spanqa.data.squad import Answer, Example, load_squad, nearest_occurrence, parse_squad
from spanqa.errors import SpanqaError

CONTEXT = "Paris is the capital of France. The capital of Italy is Rome, and Rome is old."
ROME = [i for i in range(len(CONTEXT)) if CONTEXT.startswith("Rome", i)]


def squad(qas: list[dict], context: str = CONTEXT) -> dict:
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def qa(qid: str, answers: list[dict], is_impossible: bool = False) -> dict:
    return {"id": qid, "question": "Which?", "answers": answers, "is_impossible": is_impossible}


def test_v2_fixture_parses_with_unanswerable_questions(tiny_squad_file):
    examples, report = load_squad(tiny_squad_file)
    raw = json.loads(tiny_squad_file.read_text())
    n = sum(len(p["qas"]) for a in raw["data"] for p in a["paragraphs"])
    assert len(examples) == report["questions"] == n
    assert report["impossible"] == sum(ex.is_impossible for ex in examples) > 0
    assert all(not ex.answers for ex in examples if ex.is_impossible)
    assert all(ex.answers for ex in examples if not ex.is_impossible)
    # several gold answers are kept, in file order
    assert max(len(ex.answers) for ex in examples) > 1
    assert report["answers_repaired"] == report["answers_dropped"] == 0


def test_v1_fixture_parses_without_is_impossible(tiny_squad_v1_file):
    examples, report = load_squad(tiny_squad_v1_file)
    assert examples and report["impossible"] == 0
    assert all(not ex.is_impossible and ex.answers for ex in examples)


def test_plausible_answers_are_not_targets():
    q = qa("a", [], is_impossible=True)
    q["plausible_answers"] = [{"text": "Paris", "answer_start": 0}]
    (example,), report = parse_squad(squad([q]), "f.json")
    assert example.is_impossible and example.answers == ()


def test_misplaced_answer_is_repaired_to_the_nearest_occurrence():
    # "Rome" occurs twice; a start two characters before the second one is moved to it
    (example,), report = parse_squad(
        squad([qa("a", [{"text": "Rome", "answer_start": ROME[1] - 2}])]), "f.json"
    )
    assert example.answers == (Answer("Rome", ROME[1]),)
    assert report.answers_repaired == 1 and report.answers_dropped == 0
    assert report.issues[0].startswith("f.json: data[0].paragraphs[0].qas[0].answers[0]: repaired:")


def test_answer_start_outside_the_context_is_repaired_or_dropped():
    answers = [{"text": "France", "answer_start": 512}, {"text": "Berlin", "answer_start": 512}]
    (example,), report = parse_squad(squad([qa("a", answers)]), "dev.json")
    assert example.answers == (Answer("France", CONTEXT.index("France")),)
    assert (report.answers_repaired, report.answers_dropped) == (1, 1)
    assert report.issues[1] == (
        f"dev.json: data[0].paragraphs[0].qas[0].answers[1]: dropped: answer_start 512 is outside the "
        f"context (length {len(CONTEXT)}); the text does not occur in the context"
    )


def test_question_without_a_valid_answer_is_dropped_and_counted():
    examples, report = parse_squad(squad([qa("a", [{"text": "Berlin", "answer_start": 0}])]), "f.json")
    assert examples == [] and report.questions_dropped == 1 and report.answers_dropped == 1


@pytest.mark.parametrize("blank", ["", "   ", "\u200b\u200b", "\u200b \ufeff\n"])
def test_blank_questions_and_contexts_are_dropped_and_counted(blank):
    """Whitespace or zero-width characters only: nothing to answer from or about; counted, not trained on."""
    data = squad([qa("a", [{"text": "France", "answer_start": 24}]), qa("b", [], is_impossible=True)])
    data["data"][0]["paragraphs"][0]["qas"][1]["question"] = blank
    examples, report = parse_squad(data, "f.json")
    assert [ex.id for ex in examples] == ["a"] and report.blank_questions_dropped == 1
    assert "qas[1].question: dropped: no visible character" in report.issues[0]
    data["data"][0]["paragraphs"][0]["context"] = blank
    examples, report = parse_squad(data, "f.json")
    assert examples == [] and report.blank_context_questions_dropped == 2


def test_first_occurrence_starts_are_accepted_as_they_are():
    # the shared dev file may point at the first occurrence of an answer: that is valid, not repaired
    (example,), report = parse_squad(squad([qa("a", [{"text": "Rome", "answer_start": ROME[0]}])]), "f.json")
    assert example.answers == (Answer("Rome", ROME[0]),) and report.answers_repaired == 0


def test_nearest_occurrence():
    assert nearest_occurrence("ab ab ab", "ab", 4) == 3
    assert nearest_occurrence("ab ab ab", "ab", 100) == 6
    assert nearest_occurrence("ab", "cd", 0) is None


def test_example_json_round_trip():
    ex = Example("i", "t", "q?", "ctx", (Answer("c", 0),), False)
    assert Example.from_json(json.loads(json.dumps(ex.to_json()))) == ex


BASE = squad([qa("a", [{"text": "France", "answer_start": 24}]), qa("b", [], is_impossible=True)])


def mutated(edit) -> dict:
    data = copy.deepcopy(BASE)
    edit(data)
    return data


BAD_DOCUMENTS = {
    "top-level list": ([1, 2], "f.json: top level must be an object with a 'data' list (SQuAD format)"),
    "data not a list": ({"data": {}}, "f.json: data: must be a list, got an object"),
    "article not an object": ({"data": [3]}, "f.json: data[0]: must be an object, got a number"),
    "missing paragraphs": ({"data": [{"title": "x"}]}, "f.json: data[0].paragraphs: missing field"),
    "missing context": (
        mutated(lambda d: d["data"][0]["paragraphs"][0].pop("context")),
        "f.json: data[0].paragraphs[0].context: missing field",
    ),
    "mistyped answer_start": (
        mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="24")),
        "f.json: data[0].paragraphs[0].qas[0].answers[0].answer_start: must be an integer, got a string",
    ),
    "boolean answer_start": (
        mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=True)),
        "f.json: data[0].paragraphs[0].qas[0].answers[0].answer_start: must be an integer, got a boolean",
    ),
    "missing question": (
        mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question")),
        "f.json: data[0].paragraphs[0].qas[1].question: missing field",
    ),
    "null id": (
        mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id=None)),
        "f.json: data[0].paragraphs[0].qas[1].id: must be a string, got null",
    ),
    "duplicate id": (
        mutated(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="a")),
        "f.json: data[0].paragraphs[0].qas[1].id: duplicate question id 'a' "
        "(first at data[0].paragraphs[0].qas[0])",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_bad_documents_name_the_json_path(case):
    document, message = BAD_DOCUMENTS[case]
    with pytest.raises(SpanqaError) as err:
        parse_squad(document, "f.json")
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_not_json_and_truncated_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json")
    with pytest.raises(SpanqaError, match=r"bad.json: not valid JSON: Expecting value \(line 1, column 1\)"):
        load_squad(bad)
    bad.write_text(json.dumps(BASE)[:-20])
    with pytest.raises(SpanqaError, match=r"bad.json: truncated JSON: .* \(line 1, column \d+\)"):
        load_squad(bad)
    with pytest.raises(SpanqaError, match="missing.json: no such data file"):
        load_squad(tmp_path / "missing.json")
