"""Read MRQA 2019 shared-task files (TriviaQA, NewsQA, SearchQA, HotpotQA, NaturalQuestions, ...) into
the same validated `Example`s as SQuAD's, so that windows, stores, training and evaluation are unchanged.

An MRQA file is JSON lines, usually gzipped (`.jsonl.gz`): a header line `{"header": {"dataset": ...}}`,
then one context per line, `{"context": ..., "qas": [{"qid", "question", "answers", "detected_answers"},
...]}`. `answers` are the accepted texts (the golds that MRQA's official script scores against, found in
the context or not); `detected_answers` are where MRQA found them in the context, `{"text", "char_spans":
[[start, end], ...]}` with INCLUSIVE ends. Every question is answerable.

Training labels: the earliest detected character span of a question (SpanBERT's run_mrqa.py sorts all
spans and takes the first), so `Example.answers` lists the detected spans in context order. Unlike SQuAD's
`answer_start`, a span here is the file's own claim of where its text is: a span outside its context, or
one whose text is not the context's, is an error naming the file, line and JSON path, not a repair. A
question without detected answers is dropped and counted (as SQuAD's answerable questions without a valid
answer are).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spanqa.data.squad import Answer, Example, ValidationReport, json_field, require
from spanqa.errors import SpanqaError
from spanqa.io import read_data_text

HEADER_HINT = '{"header": {"dataset": NAME, "split": ...}}'


def load_mrqa(path: str | Path) -> tuple[list[Example], dict]:
    """Examples of an MRQA file (one per question) and the validation report as a dict."""
    examples, report, _ = parse_mrqa(read_data_text(path), str(path))
    return examples, report.as_dict()


def mrqa_lines(text: str, source: str) -> tuple[dict, Iterator[tuple[int, dict]]]:
    """The header object and the context lines as (line number, object); SpanqaError naming the line
    at the first line that is not a JSON object, or when the header line is missing."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise SpanqaError(f"{source}: empty file (expected an MRQA header line {HEADER_HINT})")
    header = _json_line(lines[first], source, first + 1, last=first == len(lines) - 1)
    if not isinstance(header, dict) or not isinstance(header.get("header"), dict):
        raise SpanqaError(
            f"{source}: line {first + 1}: missing MRQA header: the first line must be {HEADER_HINT}"
        )

    def contexts() -> Iterator[tuple[int, dict]]:
        for i in range(first + 1, len(lines)):
            if lines[i].strip():
                obj = _json_line(lines[i], source, i + 1, last=i == len(lines) - 1)
                require(obj, dict, f"{source}: line {i + 1}", "$")
                yield i + 1, obj

    return header["header"], contexts()


def _json_line(line: str, source: str, number: int, last: bool) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        # the last line ending mid-object is a file cut short (a plain-text copy of a truncated download)
        cut_short = last and (err.pos >= len(line.rstrip()) or err.msg.startswith("Unterminated string"))
        kind = "truncated JSON" if cut_short else "not valid JSON"
        raise SpanqaError(f"{source}: line {number}: {kind}: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise SpanqaError(f"{source}: line {number}: JSON nested too deeply to read") from None


def parse_mrqa(text: str, source: str) -> tuple[list[Example], ValidationReport, dict]:
    """(examples, validation report, header) of an MRQA file's text."""
    header, contexts = mrqa_lines(text, source)
    title = header.get("dataset") if isinstance(header.get("dataset"), str) else ""
    report = ValidationReport()
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, obj in contexts:
        at = f"{source}: line {number}"
        context = json_field(obj, "context", str, at)
        if not context.strip():
            raise SpanqaError(f"{at}: context: empty context")
        for q, qa in enumerate(json_field(obj, "qas", list, at)):
            require(qa, dict, at, f"qas[{q}]")
            example = _parse_question(qa, title, context, at, f"qas[{q}]", report)
            if example.id in seen:
                first = seen[example.id]
                raise SpanqaError(
                    f"{at}: qas[{q}].qid: duplicate question id {example.id!r} (first at line {first})"
                )
            seen[example.id] = number
            if example.answers:
                examples.append(example)
    return examples, report, header


def _parse_question(
    qa: dict, title: str, context: str, at: str, qat: str, report: ValidationReport
) -> Example:
    qid = json_field(qa, "qid", str, at, qat)
    question = json_field(qa, "question", str, at, qat)
    for i, text in enumerate(json_field(qa, "answers", list, at, qat)):
        require(text, str, at, f"{qat}.answers[{i}]")
    if json_field(qa, "is_impossible", bool, at, qat, default=False):
        raise SpanqaError(f"{at}: {qat}.is_impossible: true, but MRQA questions are all answerable")
    report.questions += 1
    report.answerable += 1
    spans = set()
    for d, detected in enumerate(json_field(qa, "detected_answers", list, at, qat)):
        dat = f"{qat}.detected_answers[{d}]"
        require(detected, dict, at, dat)
        text = json_field(detected, "text", str, at, dat)
        for s, span in enumerate(json_field(detected, "char_spans", list, at, dat)):
            spans.add(checked_span(span, text, context, at, f"{dat}.char_spans[{s}]"))
            report.answers += 1
    if not spans:
        report.questions_dropped += 1
        report.note(f"{at}: {qat}: dropped: no detected answer in the context")
    answers = tuple(Answer(context[start : end + 1], start) for start, end in sorted(spans))
    return Example(qid, title, question, context, answers, False)


def checked_span(span: Any, text: str, context: str, at: str, sat: str) -> tuple[int, int]:
    """(start, end) of an inclusive character span, checked to lie inside `context` and to spell `text`."""
    if (
        not isinstance(span, list)
        or len(span) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
    ):
        raise SpanqaError(f"{at}: {sat}: must be [start, end] (two integers), got {json.dumps(span)}")
    start, end = span
    if not 0 <= start <= end < len(context):
        raise SpanqaError(
            f"{at}: {sat}: [{start}, {end}] is outside its context (characters 0..{len(context) - 1})"
        )
    found = context[start : end + 1]
    if found != text:
        raise SpanqaError(f"{at}: {sat}: context[{start}:{end + 1}] is {found!r}, not the answer's {text!r}")
    return start, end


def mrqa_gold_answers(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """(qid, accepted answer texts) of every question, in file order, exactly as MRQA's official script
    reads them (`qa["answers"]`); only the structure the scorer relies on is checked."""
    source = str(path)
    _, contexts = mrqa_lines(read_data_text(path), source)
    golds = []
    for number, obj in contexts:
        at = f"{source}: line {number}"
        for q, qa in enumerate(json_field(obj, "qas", list, at)):
            require(qa, dict, at, f"qas[{q}]")
            texts = json_field(qa, "answers", list, at, f"qas[{q}]")
            for i, text in enumerate(texts):
                require(text, str, at, f"qas[{q}].answers[{i}]")
            golds.append((json_field(qa, "qid", str, at, f"qas[{q}]"), tuple(texts)))
    return golds
