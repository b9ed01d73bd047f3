"""`spanqa predict`: answer questions with a model exported by training (span or CRF head), no DeepSpeed.

    spanqa predict --model out/best_model --question "Who wrote it?" --context "It was written by ..."
    spanqa predict --model out/best_model --input questions.jsonl --output predictions.json

`--input` takes SQuAD JSON (v1.1/v2.0; gold answers, if any, are ignored) or JSON lines of
{"id", "question", "context"}. The output maps each id to {"answer", "score", "null_odds"}: the answer is
"" when the null odds (null score − best span score, on the head's own scale) exceed the null threshold.

Inputs go through exactly the windows that training and evaluation use: they are written as a temporary
SQuAD file and prepared into a temporary window store by `spanqa.data.prepare`, so long contexts are cut
into the same overlapping windows with the model's own window settings (spanqa_config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spanqa import io
from spanqa.data.squad import walk_questions
from spanqa.errors import SpanqaError
from spanqa.export import ExportInfo


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    context: str


@dataclass
class Prediction:
    answer: str
    score: float | None  # best span score on the head's scale; None when no span could be formed
    null_odds: float | None  # null score - best span score; None when there was no span at all
    windows: int  # how many windows the context was cut into

    def as_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "score": self.score, "null_odds": self.null_odds}


# ------------------------------------------------------------------------------------------------ inputs


def read_questions(path: str | Path) -> list[Question]:
    """Questions from SQuAD JSON or JSON lines; SpanqaError naming the file and line/JSON path."""
    path = Path(path)
    text = io.read_text(path, "questions file")
    if not text.strip():
        raise SpanqaError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        data = None  # not one JSON document: JSON lines, or broken (json_lines says where)
    if isinstance(data, dict) and "data" in data:
        questions = squad_questions(data, str(path))
    elif isinstance(data, list):
        return questions_from_records(data, str(path))
    else:
        questions = json_lines(text, str(path))
    return _checked_unique(questions, str(path))


def questions_from_records(items: list, source: str) -> list[Question]:
    """Questions from a list of {"question", "context", optional "id"} objects (the id defaults to the
    position); SpanqaError naming `source` and the position of a bad one."""
    return _checked_unique(
        [_question(item, source, f"[{i}]", str(i)) for i, item in enumerate(items)], source
    )


def squad_questions(data: dict, source: str) -> list[Question]:
    questions = []
    for raw in walk_questions(data, source):
        qid = raw.qa.get("id")
        if not isinstance(qid, str) or not qid:
            raise SpanqaError(f"{source}: {raw.at}.id: expected a non-empty string")
        questions.append(Question(qid, _text(raw.qa, "question", source, raw.at), raw.context))
    return questions


def json_lines(text: str, source: str) -> list[Question]:
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            detail = (
                f"{err.msg}, column {err.colno}"
                if isinstance(err, json.JSONDecodeError)
                else "nested too deeply"
            )
            raise SpanqaError(
                f"{source}: line {number}: not valid JSON ({detail}); "
                'expected SQuAD JSON or JSON lines of {"id", "question", "context"}'
            ) from None
        questions.append(_question(item, source, f"line {number}", f"line{number}"))
    return questions


def _question(item: Any, source: str, at: str, default_id: str) -> Question:
    if not isinstance(item, dict):
        raise SpanqaError(f'{source}: {at}: expected an object with "question" and "context"')
    qid = item.get("id", default_id)
    if not isinstance(qid, str | int) or isinstance(qid, bool) or qid == "":
        raise SpanqaError(f"{source}: {at}: id: expected a non-empty string")
    return Question(str(qid), _text(item, "question", source, at), _text(item, "context", source, at))


def _text(obj: dict, key: str, source: str, at: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise SpanqaError(f"{source}: {at}.{key}: expected a string, found {found}")
    if not value.strip():
        raise SpanqaError(f"{source}: {at}.{key}: empty")
    return value


def _checked_unique(questions: list[Question], source: str) -> list[Question]:
    if not questions:
        raise SpanqaError(f"{source}: no questions")
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise SpanqaError(f"{source}: duplicate question id {q.id!r}")
        seen.add(q.id)
    return questions


# --------------------------------------------------------------------------------------------- predicting


def predict(
    model: Any,
    tokenizer: Any,
    questions: list[Question],
    info: ExportInfo,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, Prediction]:
    """Answers to `questions` from a loaded model (see `spanqa.export.load_export`), through the
    export's window and answer settings."""
    with tempfile.TemporaryDirectory(prefix="spanqa-predict-") as tmp:
        store = prepare_store(questions, tokenizer, Path(tmp), info)
        inferred = run_windows(model, store, info, batch_size, device)
        return select(inferred, store, info)


def prepare_store(questions: list[Question], tokenizer: Any, tmp: Path, info: ExportInfo):
    """The window store of `questions`, built by the same `prepare` as training data."""
    from spanqa.data.prepare import prepare

    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "",
                # One paragraph per question; `prepare` tokenizes each distinct context once anyway.
                # Marked unanswerable so that validation keeps them (a question with no gold answer
                # is otherwise dropped); the labels play no part in prediction.
                "paragraphs": [
                    {
                        "context": q.context,
                        "qas": [{"id": q.id, "question": q.question, "is_impossible": True}],
                    }
                    for q in questions
                ],
            }
        ],
    }
    source = io.write_json(tmp / "questions.json", squad, indent=None)
    return prepare(source, tokenizer, tmp / "store", info.windows, progress=False)


def run_windows(model: Any, store: Any, info: ExportInfo, batch_size: int, device: str):
    """The answer candidates of every window of `store` (spanqa.eval.infer.Inferred)."""
    import torch

    from spanqa.data.loader import eval_batches, make_loader
    from spanqa.eval.infer import infer_candidates

    model = model.to(device).eval()
    loader = make_loader(store, eval_batches(store.window_lengths, batch_size))
    answers = info.answers
    with torch.inference_mode():
        return infer_candidates(
            model, model, loader, torch.device(device), answers.n_best_size, answers.max_answer_length
        )


def select(inferred, store, info: ExportInfo) -> dict[str, Prediction]:
    import numpy as np

    from spanqa.eval.postprocess import best_per_example, select_answers

    examples = store.examples()
    cands, indices = inferred.candidates, inferred.window_indices
    answers, null_odds = select_answers(cands, indices, store, null_threshold=info.answers.null_threshold)
    best = best_per_example(cands, indices, store, len(examples))
    windows = np.bincount(np.asarray(store.example_index, dtype=np.int64), minlength=len(examples))
    return {
        ex.id: Prediction(
            answer=answers[ex.id],
            score=_finite(best["score"][i]),
            null_odds=_finite(null_odds[ex.id]),
            windows=int(windows[i]),
        )
        for i, ex in enumerate(examples)
    }


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spanqa predict", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="directory written by training (OUTPUT_DIR/best_model)"
    )
    parser.add_argument("--question", help="one question (with --context)")
    parser.add_argument("--context", help="the passage that --question is asked about")
    parser.add_argument("--input", help='SQuAD JSON or JSON lines of {"id", "question", "context"}')
    parser.add_argument("--output", help="predictions JSON to write (default with --input: predictions.json)")
    parser.add_argument("--batch_size", type=int, default=32, help="windows per forward pass")
    parser.add_argument(
        "--null_threshold", type=float, help='answer "" when null odds exceed it (default: the export\'s)'
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda when available, else cpu)"
    )
    return parser.parse_args(argv)


def questions_from_args(args: argparse.Namespace) -> list[Question]:
    if args.input is not None:
        if args.question is not None or args.context is not None:
            raise SpanqaError("--input: give either --input or --question/--context, not both")
        return read_questions(args.input)
    if args.question is None or args.context is None:
        missing = "--context" if args.question is not None else "--question"
        if args.question is None and args.context is None:
            raise SpanqaError("--input or --question/--context: nothing to answer")
        raise SpanqaError(f"{missing}: needed with {'--question' if missing == '--context' else '--context'}")
    for flag, value in (("--question", args.question), ("--context", args.context)):
        if not value.strip():
            raise SpanqaError(f"{flag}: empty")
    return [Question("question", args.question, args.context)]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SpanqaError(f"--batch_size: must be a positive integer, got {args.batch_size}")
    questions = questions_from_args(args)
    from transformers.utils import logging as transformers_logging

    from spanqa.export import load_export

    transformers_logging.disable_progress_bar()  # a per-file "Loading weights" bar is noise here
    model, tokenizer, info = load_export(args.model)
    if args.null_threshold is not None:
        answers = dataclasses.replace(info.answers, null_score_diff_threshold=args.null_threshold)
        info = dataclasses.replace(info, answers=answers)
    device = args.device or _default_device()
    predictions = predict(model, tokenizer, questions, info, args.batch_size, device)
    output = {qid: p.as_json() for qid, p in predictions.items()}

    out_path = args.output or ("predictions.json" if args.input is not None else None)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        io.write_json(out_path, output)
        answered = sum(1 for p in predictions.values() if p.answer)
        windows = sum(p.windows for p in predictions.values())
        print(
            f"{len(predictions)} questions ({windows} windows, {answered} answered, "
            f"{len(predictions) - answered} no answer) -> {out_path}",
            file=sys.stderr,
        )
    if args.input is None:
        print(json.dumps(output["question"], ensure_ascii=False))
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
