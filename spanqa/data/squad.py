"""Parse and validate SQuAD v1.1 / v2.0 JSON.

`walk_questions` is the one walk over a SQuAD document (articles, paragraphs, questions) that every
reader shares: training's parser here, the scorer's gold reader and `spanqa predict`'s input reader.
Structural problems (not JSON, wrong shape, missing or mistyped fields, empty context, duplicate ids)
raise `SpanqaError` naming the file and the JSON path. Answers whose `answer_start` does not point at
their text are repaired (nearest occurrence of the text in the context) or dropped, and every repair and
drop is counted in the validation report, with its JSON path, so nothing is lost silently.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spanqa.errors import SpanqaError
from spanqa.io import read_json

MAX_REPORTED_ISSUES = 50  # the report keeps the first issues verbatim and counts all of them


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset of `text` inside the context


@dataclass(frozen=True)
class Example:
    id: str
    title: str
    question: str
    context: str
    answers: tuple[Answer, ...]  # empty when the question is unanswerable
    is_impossible: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "question": self.question,
            "context": self.context,
            "answers": [{"text": a.text, "answer_start": a.start} for a in self.answers],
            "is_impossible": self.is_impossible,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        answers = tuple(Answer(a["text"], a["answer_start"]) for a in d["answers"])
        return cls(d["id"], d["title"], d["question"], d["context"], answers, d["is_impossible"])


@dataclass
class ValidationReport:
    """What validation changed; stored in the window store's meta.json and printed by `spanqa prepare`."""

    questions: int = 0
    answerable: int = 0
    impossible: int = 0
    answers: int = 0
    answers_repaired: int = 0
    answers_dropped: int = 0
    questions_dropped: int = 0  # answerable questions left without any valid answer
    blank_questions_dropped: int = 0  # question text without a visible character
    blank_context_questions_dropped: int = 0  # asked of a context without a visible character
    issues: list[str] | None = None  # the first MAX_REPORTED_ISSUES repairs/drops, with their JSON path

    def note(self, message: str) -> None:
        self.issues = self.issues or []
        if len(self.issues) < MAX_REPORTED_ISSUES:
            self.issues.append(message)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["issues"] = list(self.issues or [])
        return d


def load_squad(path: str | Path) -> tuple[list[Example], dict]:
    """Examples of a SQuAD v1.1/v2.0 file (one per question) and the validation report as a dict."""
    data = read_json(path, "data file")
    examples, report = parse_squad(data, source=str(path))
    return examples, report.as_dict()


@dataclass(frozen=True)
class RawQuestion:
    """One question of a SQuAD document as it stands in the file, with where it stands."""

    at: str  # JSON path of the question object, e.g. data[0].paragraphs[2].qas[1]
    title: str
    context: str
    qa: dict


def walk_questions(data: Any, source: str) -> Iterator[RawQuestion]:
    """Every question object of a SQuAD document, in file order; SpanqaError at the first structural
    problem of the articles and paragraphs (the question objects themselves are the caller's)."""
    if not isinstance(data, dict) or "data" not in data:
        raise SpanqaError(f"{source}: top level must be an object with a 'data' list (SQuAD format)")
    for a, article in enumerate(json_field(data, "data", list, source)):
        at = f"data[{a}]"
        require(article, dict, source, at)
        title = json_field(article, "title", str, source, at, default="")
        for p, paragraph in enumerate(json_field(article, "paragraphs", list, source, at)):
            pat = f"{at}.paragraphs[{p}]"
            require(paragraph, dict, source, pat)
            context = json_field(paragraph, "context", str, source, pat)
            for q, qa in enumerate(json_field(paragraph, "qas", list, source, pat)):
                qat = f"{pat}.qas[{q}]"
                require(qa, dict, source, qat)
                yield RawQuestion(qat, title, context, qa)


def parse_squad(data: Any, source: str) -> tuple[list[Example], ValidationReport]:
    report = ValidationReport()
    examples: list[Example] = []
    seen_ids: dict[str, str] = {}
    for raw in walk_questions(data, source):
        example = _parse_question(raw.qa, raw.title, raw.context, source, raw.at, report)
        if example is None:
            continue
        if example.id in seen_ids:
            raise SpanqaError(
                f"{source}: {raw.at}.id: duplicate question id {example.id!r} "
                f"(first at {seen_ids[example.id]})"
            )
        seen_ids[example.id] = raw.at
        if example.is_impossible or example.answers:
            examples.append(example)
    return examples, report


def has_text(text: str) -> bool:
    """Whether `text` has a visible character: not only white space, zero-width or control characters."""
    return any(
        not (ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp")) for ch in text
    )


def _parse_question(
    qa: dict, title: str, context: str, source: str, at: str, report: ValidationReport
) -> Example | None:
    """The question as an Example; None (counted in the report) when it or its context is blank."""
    qid = json_field(qa, "id", str, source, at)
    question = json_field(qa, "question", str, source, at)
    is_impossible = json_field(qa, "is_impossible", bool, source, at, default=False)
    raw_answers = json_field(qa, "answers", list, source, at, default=[])
    report.questions += 1
    if not has_text(context):
        report.blank_context_questions_dropped += 1
        report.note(f"{source}: {at}: dropped: its context has no visible character")
        return None
    if not has_text(question):
        report.blank_questions_dropped += 1
        report.note(f"{source}: {at}.question: dropped: no visible character")
        return None
    if is_impossible:
        # v2.0: unanswerable questions carry no training target; `plausible_answers` are ignored on purpose
        report.impossible += 1
        return Example(qid, title, question, context, (), True)
    report.answerable += 1
    answers = []
    for i, raw in enumerate(raw_answers):
        aat = f"{at}.answers[{i}]"
        require(raw, dict, source, aat)
        text = json_field(raw, "text", str, source, aat)
        start = json_field(raw, "answer_start", int, source, aat)
        report.answers += 1
        answer = _checked_answer(text, start, context, f"{source}: {aat}", report)
        if answer is not None:
            answers.append(answer)
    if not answers:
        report.questions_dropped += 1
        report.note(f"{source}: {at}: dropped: answerable question without a valid answer")
    return Example(qid, title, question, context, tuple(answers), False)


def _checked_answer(text: str, start: int, context: str, at: str, report: ValidationReport) -> Answer | None:
    if text and 0 <= start < len(context) and context[start : start + len(text)] == text:
        return Answer(text, start)
    if not text.strip():
        problem = "empty answer text"
    elif not 0 <= start < len(context):
        problem = f"answer_start {start} is outside the context (length {len(context)})"
    else:
        problem = (
            f"context[{start}:{start + len(text)}] is {context[start : start + len(text)]!r}, not {text!r}"
        )
    found = nearest_occurrence(context, text, start) if text.strip() else None
    if found is None:
        report.answers_dropped += 1
        report.note(f"{at}: dropped: {problem}; the text does not occur in the context")
        return None
    report.answers_repaired += 1
    report.note(f"{at}: repaired: {problem}; moved to {found}")
    return Answer(text, found)


def nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Start of the occurrence of `text` in `context` closest to `start`, or None."""
    best = None
    i = context.find(text)
    while i != -1:
        if best is None or abs(i - start) < abs(best - start):
            best = i
        i = context.find(text, i + 1)
    return best


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false"}


def require(value: Any, kind: type, source: str, at: str) -> None:
    """SpanqaError "SOURCE: AT: must be KIND, got TYPE" unless `value` is of `kind`."""
    # bool is an int subclass in Python, but `"answer_start": true` is a mistake, not an offset
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpanqaError(f"{source}: {at}: must be {_TYPE_NAMES[kind]}, got {_json_type(value)}")


_MISSING = object()


def json_field(obj: dict, key: str, kind: type, source: str, at: str = "", default: Any = _MISSING) -> Any:
    """obj[key] checked to be of `kind`, named by its JSON path in errors; required without a default."""
    path = f"{at}.{key}" if at else key
    if key not in obj:
        if default is _MISSING:
            raise SpanqaError(f"{source}: {path}: missing field")
        return default
    require(obj[key], kind, source, path)
    return obj[key]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    names[float] = "a number"
    return "null" if value is None else names.get(type(value), type(value).__name__)
