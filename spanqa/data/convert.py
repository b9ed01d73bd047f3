"""`spanqa convert --to mrqa`: a SQuAD file as an MRQA file (JSON lines, gzipped when OUT ends in .gz).

    spanqa convert --to mrqa --data_file spanqa/sample/dev.json --out dev.jsonl.gz

One line per paragraph, after a header line. Each answerable question keeps its id (as "qid" and "id"),
its question, its gold texts exactly as the file gives them ("answers", what MRQA's scorer reads) and its
validated answers as "detected_answers" (grouped by text, inclusive character spans, in the file's
order; answers the SQuAD parser repaired are where it moved them). MRQA has no unanswerable questions:
they are left out, and so are answerable questions without a valid answer (the parser's report counts
them), which an MRQA file could not label; the summary says how many. spaCy's `context_tokens` and
`token_spans` are not written: spanqa tokenizes with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from spanqa import io
from spanqa.data.formats import SQUAD, detect_format, read_squad_document
from spanqa.data.squad import Example, parse_squad, walk_questions
from spanqa.errors import SpanqaError


@dataclass
class Converted:
    contexts: int = 0
    questions: int = 0
    unanswerable: int = 0  # left out: MRQA has none
    without_valid_answer: int = 0  # left out: nothing to label them with


def squad_to_mrqa_lines(data_file: str | Path, dataset: str) -> tuple[list[dict], Converted]:
    """The MRQA objects (header first) of a SQuAD file, and what was converted and left out."""
    source = str(data_file)
    data = read_squad_document(data_file)
    examples = {ex.id: ex for ex in parse_squad(data, source)[0]}
    counts = Converted()
    lines: list[dict] = [{"header": {"dataset": dataset, "split": Path(source).name}}]
    contexts: dict[str, dict] = {}  # paragraph JSON path -> its MRQA line, in file order
    for raw in walk_questions(data, source):
        qid = raw.qa.get("id")
        example = examples.get(qid)
        if example is None or example.is_impossible:
            counts.unanswerable += example is not None
            counts.without_valid_answer += example is None
            continue
        paragraph = raw.at.rsplit(".qas[", 1)[0]
        if paragraph not in contexts:
            contexts[paragraph] = {"id": f"{source}:{paragraph}", "context": raw.context, "qas": []}
            lines.append(contexts[paragraph])
        golds = [answer["text"] for answer in raw.qa.get("answers", [])]
        contexts[paragraph]["qas"].append(mrqa_question(example, golds))
        counts.questions += 1
    counts.contexts = len(contexts)
    return lines, counts


def mrqa_question(example: Example, golds: list[str]) -> dict:
    detected: dict[str, list[list[int]]] = {}
    for answer in example.answers:
        spans = detected.setdefault(answer.text, [])
        span = [answer.start, answer.start + len(answer.text) - 1]  # MRQA's ends are inclusive
        if span not in spans:
            spans.append(span)
    return {
        "qid": example.id,
        "id": example.id,
        "question": example.question,
        "answers": golds,
        "detected_answers": [{"text": text, "char_spans": spans} for text, spans in detected.items()],
        "is_impossible": False,
    }


def write_lines(out: Path, lines: list[dict]) -> Path:
    """JSON lines, gzipped (with a fixed timestamp, so that the same input gives the same bytes) when
    the name ends in .gz; written atomically."""
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    if out.name.endswith(".gz"):
        text = gzip.compress(text, mtime=0)
    with io.atomic_file(out, binary=True) as f:
        f.write(text)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spanqa convert", description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, choices=["mrqa"], help="the format to write")
    parser.add_argument("--data_file", required=True, help="the SQuAD v1.1/v2.0 JSON file to convert")
    parser.add_argument("--out", required=True, help="the MRQA file to write (.jsonl.gz: gzipped)")
    parser.add_argument("--dataset", default="SQuAD", help='the header\'s "dataset" (default SQuAD)')
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SpanqaError(f"--out: {out} exists; spanqa does not overwrite it (remove it, or pick another)")
    if not out.parent.is_dir():
        raise SpanqaError(f"--out: {out.parent}: no such directory")
    if detect_format(args.data_file) != SQUAD:
        raise SpanqaError(f"--data_file: {args.data_file}: is MRQA already (converts SQuAD to MRQA)")
    lines, counts = squad_to_mrqa_lines(args.data_file, args.dataset)
    if not counts.questions:
        raise SpanqaError(f"--data_file: {args.data_file}: no answerable question to convert")
    write_lines(out, lines)
    print(
        f"wrote {out}: {counts.contexts:,} contexts, {counts.questions:,} questions; left out "
        f"{counts.unanswerable:,} unanswerable (MRQA has none) and {counts.without_valid_answer:,} "
        "without a valid answer"
    )
    return 0
