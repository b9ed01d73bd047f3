"""`spanqa predict`: answer questions with a model exported by training (span or CRF head), no DeepSpeed.

    spanqa predict --model out/best_model --question "Who wrote it?" --context "It was written by ..."
    spanqa predict --model out/best_model --input questions.jsonl --output predictions.json

`--input` takes SQuAD JSON (v1.1/v2.0; gold answers, if any, are ignored) or JSON lines of
{"id", "question", "context"}. It writes the official SQuAD v2 files, which `spanqa evaluate` (and the
official script) reads: `--output` maps each id to its answer text ("" = no answer: the null odds, null
score − best span score on the head's own scale, exceed the model's null threshold) and `--null_odds` each
id to its null odds; `--details` also writes {"answer", "score", "null_odds", "windows"} per id.

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
from spanqa.data.squad import has_text, walk_questions
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
    if not has_text(value):
        raise SpanqaError(f"{source}: {at}.{key}: empty (no visible character)")
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
    progress: bool = False,
) -> dict[str, Prediction]:
    """Answers to `questions` from a loaded model (see `spanqa.export.load_export`), through the
    export's window and answer settings; `progress`: a bar over the windows on stderr."""
    with tempfile.TemporaryDirectory(prefix="spanqa-predict-") as tmp:
        store = prepare_store(questions, tokenizer, Path(tmp), info)
        inferred = run_windows(model, store, info, batch_size, device, progress)
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


def run_windows(
    model: Any, store: Any, info: ExportInfo, batch_size: int, device: str, progress: bool = False
):
    """The answer candidates of every window of `store` (spanqa.eval.infer.Inferred)."""
    import torch

    from spanqa.data.loader import eval_batches, make_loader
    from spanqa.eval.infer import infer_candidates
    from spanqa.progress import progress_bar

    model = model.to(device).eval()
    loader = make_loader(store, eval_batches(store.window_lengths, batch_size))
    answers = info.answers
    with (
        torch.inference_mode(),
        progress_bar(len(store), "predict", progress, unit="window") as bar,
    ):
        return infer_candidates(
            model,
            model,
            loader,
            torch.device(device),
            answers.n_best_size,
            answers.max_answer_length,
            progress=bar,
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
    parser.add_argument(
        "--output", help="predictions JSON {id: answer text} (default with --input: predictions.json)"
    )
    parser.add_argument(
        "--null_odds",
        help="null odds JSON {id: number} (default with --input: null_odds.json beside --output)",
    )
    parser.add_argument("--details", help="also write {id: {answer, score, null_odds, windows}} here")
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
        if not has_text(value):
            raise SpanqaError(f"{flag}: empty (no visible character)")
    return [Question("question", args.question, args.context)]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SpanqaError(f"--batch_size: must be a positive integer, got {args.batch_size}")
    questions = questions_from_args(args)
    device = checked_device(args.device)
    from transformers.utils import logging as transformers_logging

    from spanqa.export import load_export

    transformers_logging.disable_progress_bar()  # a per-file "Loading weights" bar is noise here
    model, tokenizer, info = load_export(args.model)
    if args.null_threshold is not None:
        answers = dataclasses.replace(info.answers, null_score_diff_threshold=args.null_threshold)
        info = dataclasses.replace(info, answers=answers)
    predictions = predict(
        model, tokenizer, questions, info, args.batch_size, device, progress=args.input is not None
    )
    if args.input is None:
        print(json.dumps(predictions["question"].as_json(), ensure_ascii=False))
    else:
        write_outputs(predictions, args)
    return 0


def write_outputs(predictions: dict[str, Prediction], args: argparse.Namespace) -> None:
    """predictions.json and null_odds.json in the official formats (+ the details file if asked for)."""
    from spanqa.eval.evaluate import finite_odds

    out = Path(args.output or "predictions.json")
    odds_path = Path(args.null_odds) if args.null_odds else out.with_name("null_odds.json")
    odds = {qid: math.inf if p.null_odds is None else p.null_odds for qid, p in predictions.items()}
    files = {
        out: ("--output", {qid: p.answer for qid, p in predictions.items()}),
        odds_path: ("--null_odds", finite_odds(odds)),
    }
    if args.details:
        details = {qid: {**p.as_json(), "windows": p.windows} for qid, p in predictions.items()}
        files[Path(args.details)] = ("--details", details)
    for path, (flag, _) in files.items():
        if path.is_dir():
            raise SpanqaError(f"{flag}: {path} is a directory; give a file name")
    for path, (flag, content) in files.items():
        with io.writing(flag, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            io.write_json(path, content)
    answered = sum(1 for p in predictions.values() if p.answer)
    windows = sum(p.windows for p in predictions.values())
    print(
        f"{len(predictions)} questions ({windows} windows, {answered} answered, "
        f"{len(predictions) - answered} no answer) -> {', '.join(str(p) for p in files)}",
        file=sys.stderr,
    )


def checked_device(name: str | None) -> str:
    """--device as torch reads it (default: cuda when there is a GPU, else cpu), refused in one line
    when torch does not know it or this machine lacks it."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SpanqaError(f"--device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpanqaError(f"--device: {name!r}, but this machine has no CUDA device (give --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SpanqaError(
            f"--device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return name
