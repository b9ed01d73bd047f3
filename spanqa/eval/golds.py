"""The gold answers of a data file exactly as its official scorer reads them, and which scorer that is.

    read_golds("dev-v2.0.json")          # SQuAD: qa["answers"][*]["text"], scored by evaluate-v2.0.py
    read_golds("TriviaQA-dev.jsonl.gz")  # MRQA: qa["answers"], scored by mrqa_official_eval.py

The format is told by content (spanqa.data.formats), the same way training's loader tells it. These
readers neither repair nor drop answers (the training-side parsers may); they only check the structure
the scorer relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spanqa.data.formats import MRQA, SQUAD, detect_format, read_squad_document, squad_metric_for
from spanqa.data.squad import json_field, require, walk_questions


@dataclass(frozen=True)
class GoldQuestion:
    """One question as the scorer sees it: its id and its gold answer texts exactly as the file gives them."""

    id: str
    answers: tuple[str, ...]

    @property
    def has_answer(self) -> bool:
        # the official scorer decides answerability by `bool(qa["answers"])`, not by `is_impossible`
        return bool(self.answers)


@dataclass(frozen=True)
class GoldFile:
    questions: list[GoldQuestion]  # in file order, repeated ids included (each scorer decides)
    metric: str  # the file's official scorer: one of spanqa.data.formats.METRICS
    format: str  # SQUAD or MRQA
    source: str


def read_golds(path: str | Path) -> GoldFile:
    """The questions of a SQuAD or MRQA file with their gold texts untouched, and the file's scorer."""
    source = str(path)
    if detect_format(path) == MRQA:
        from spanqa.data.formats import MRQA_METRIC
        from spanqa.data.mrqa import mrqa_gold_answers

        questions = [GoldQuestion(qid, texts) for qid, texts in mrqa_gold_answers(path)]
        return GoldFile(questions, MRQA_METRIC, MRQA, source)
    data = read_squad_document(path)
    version = data.get("version") if isinstance(data, dict) else None
    return GoldFile(squad_golds(data, source), squad_metric_for(version), SQUAD, source)


def read_gold_questions(path: str | Path) -> list[GoldQuestion]:
    """`read_golds(path).questions`."""
    return read_golds(path).questions


def squad_golds(data: Any, source: str) -> list[GoldQuestion]:
    golds = []
    for raw in walk_questions(data, source):
        qid = json_field(raw.qa, "id", str, source, raw.at)
        answers = json_field(raw.qa, "answers", list, source, raw.at)
        texts = []
        for i, answer in enumerate(answers):
            require(answer, dict, source, f"{raw.at}.answers[{i}]")
            texts.append(json_field(answer, "text", str, source, f"{raw.at}.answers[{i}]"))
        golds.append(GoldQuestion(qid, tuple(texts)))
    return golds
