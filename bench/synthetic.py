"""Synthetic window stores for benchmarks: the lengths, question/context split and answer positions of a
real store (or of the measured SQuAD v2 dev histogram below), filled with random word pieces.

They are written by spanqa's own `write_store`, so the Trainer trains on them like on any store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spanqa.data.squad import Example
from spanqa.data.store import WindowStore, build_meta, write_store
from spanqa.data.windows import (
    PairTemplate,
    WindowArrays,
    WindowSettings,
    pair_template,
    tokenizer_fingerprint,
)

# Fallback window lengths where no store is given and the shared dev data is not beside the checkout.
# Measured: SQuAD v2.0 dev (11,873 questions) prepared with the all-MiniLM-L6-v2 tokenizer (BERT
# uncased WordPiece) at max_seq_length 384, doc_overlap 128, max_query_length 64 -> 12,134 windows,
# mean 180.0 tokens, median 164; context starts at token 14 (median; p10 10, p90 20).
#   spanqa prepare --data_file ../shared/data/squad2/dev-v2.0.json --tokenizer "$(python -c
#     'from spanqa.testing import minilm_dir; print(minilm_dir())')" --out /tmp/dev-minilm
# Counts of windows with length in [32 + 16·i, 48 + 16·i), then the full windows of exactly 384.
DEV_LENGTH_HISTOGRAM = (
    [
        18,
        49,
        115,
        116,
        456,
        1280,
        2027,
        1664,
        1302,
        1159,
        872,
        706,
        477,
        376,
        353,
        258,
        229,
        105,
        90,
        48,
        100,
        70,
    ],
    264,
)
DEV_CONTEXT_START = 14


@dataclass(frozen=True)
class WindowShapes:
    """Per-window structure copied into the synthetic windows (int arrays of equal length)."""

    lengths: np.ndarray
    context_start: np.ndarray
    context_end: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    source: str  # where the lengths came from, for the report


def shapes_from_store(store: WindowStore, source: str) -> WindowShapes:
    return WindowShapes(
        lengths=np.asarray(store.window_lengths, np.int64),
        context_start=np.asarray(store.context_start, np.int64),
        context_end=np.asarray(store.context_end, np.int64),
        start_positions=np.asarray(store.start_positions, np.int64),
        end_positions=np.asarray(store.end_positions, np.int64),
        source=source,
    )


def shapes_from_histogram(max_seq_length: int, seed: int = 0) -> WindowShapes:
    """DEV_LENGTH_HISTOGRAM as windows (lengths uniform inside a bin, clipped to max_seq_length)."""
    rng = np.random.default_rng(seed)
    counts, full = DEV_LENGTH_HISTOGRAM
    lengths = [rng.integers(32 + 16 * i, 48 + 16 * i, size=n) for i, n in enumerate(counts)]
    lengths = np.minimum(np.concatenate([*lengths, np.full(full, 384)]), max_seq_length)
    context_start = np.minimum(DEV_CONTEXT_START, lengths - 2)
    context_end = lengths - 2  # the last token is [SEP]
    # Half the windows hold an answer (49.1% in the measured store): a one-token span mid-context.
    answer = np.where(rng.random(len(lengths)) < 0.5, (context_start + context_end) // 2, 0)
    source = f"synthetic: SQuAD v2 dev length histogram (bench/synthetic.py), clipped to {max_seq_length}"
    return WindowShapes(lengths, context_start, context_end, answer, answer.copy(), source)


def window_shapes(store: str | None, settings: WindowSettings, seed: int) -> WindowShapes:
    """From the store at `store`, else the shared SQuAD v2 dev set prepared with the MiniLM tokenizer
    (once, cached), else the measured histogram."""
    from spanqa.data.prepare import prepare
    from spanqa.errors import SpanqaError
    from spanqa.testing import minilm_dir, shared_squad2

    if store is not None:
        opened = WindowStore.open(store)
        if opened.meta["settings"]["max_seq_length"] > settings.max_seq_length:
            raise SpanqaError(
                f"--store: {store}: windows longer than --max_seq_length {settings.max_seq_length}"
            )
        return shapes_from_store(opened, f"store {store} ({len(opened)} windows)")
    dev = shared_squad2("dev-v2.0.json")
    try:
        if dev.is_file():
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spanqa" / "bench"
            out = cache / f"dev-minilm-{'-'.join(str(v) for v in settings.as_dict().values())}"
            prepared = prepare(dev, str(minilm_dir()), out, settings, progress=False)
            return shapes_from_store(
                prepared, f"SQuAD v2 dev, MiniLM tokenizer ({len(prepared)} windows, {out})"
            )
    except SpanqaError:
        pass  # no MiniLM tokenizer installed: fall back to the measured histogram
    return shapes_from_histogram(settings.max_seq_length, seed)


def synthetic_arrays(
    shapes: WindowShapes,
    n_windows: int,
    vocab_size: int,
    template: PairTemplate,
    special_ids: list[int],
    seed: int,
) -> WindowArrays:
    """`n_windows` windows drawn from `shapes` (with replacement): random ordinary word pieces, and the
    tokenizer's special tokens around question and context as `spanqa prepare` would place them."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(shapes.lengths), size=n_windows)
    lengths = shapes.lengths[pick]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
    input_ids = rng.choice(ordinary, size=int(starts[-1])).astype(np.int64)
    char_offsets = np.full((int(starts[-1]), 2), -1, np.int64)
    context_start, context_end = shapes.context_start[pick], shapes.context_end[pick]
    prefix, middle, suffix = (
        np.asarray(part, np.int64) for part in (template.prefix, template.middle, template.suffix)
    )
    for lo, n, cs, ce in zip(starts, lengths, context_start, context_end, strict=False):
        # Where the copied window leaves less room than this tokenizer's specials take, keep what fits.
        input_ids[lo : lo + min(len(prefix), cs)] = prefix[:cs]
        between = min(len(middle), max(0, cs - len(prefix)))
        input_ids[lo + cs - between : lo + cs] = middle[len(middle) - between :]
        after = min(len(suffix), n - ce - 1)
        input_ids[lo + ce + 1 : lo + ce + 1 + after] = suffix[:after]
        char_offsets[lo + cs : lo + ce + 1, 0] = np.arange(ce - cs + 1) * 5
        char_offsets[lo + cs : lo + ce + 1, 1] = np.arange(ce - cs + 1) * 5 + 4
    return WindowArrays(
        input_ids=input_ids,
        char_offsets=char_offsets,
        window_starts=starts,
        window_lengths=lengths,
        context_start=context_start,
        context_end=context_end,
        start_positions=shapes.start_positions[pick],
        end_positions=shapes.end_positions[pick],
        example_index=np.arange(n_windows),
    )


def write_synthetic_store(
    out_dir: Path, shapes: WindowShapes, n_windows: int, model_dir: Path, settings: dict, seed: int
) -> WindowStore:
    """A window store in spanqa's format (written by spanqa.data.store), one example per window."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = pair_template(tokenizer)
    vocab_size = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    arrays = synthetic_arrays(shapes, n_windows, vocab_size, template, tokenizer.all_special_ids, seed)
    examples = [
        Example(
            id=f"synthetic-{i}", title="synthetic", question="?", context="x", answers=(), is_impossible=True
        )
        for i in range(n_windows)
    ]
    meta = build_meta(
        arrays,
        n_windows,
        tokenizer={
            "name_or_path": str(model_dir),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "second_type_id": template.second_type_id,
            "n_special": template.n_special,
        },
        settings=settings,
        source={"path": f"synthetic ({shapes.source})", "sha256": ""},
        validation={},
    )
    write_store(out_dir, arrays, examples, meta)
    return WindowStore.open(out_dir)


# ------------------------------------------------------------------------------ MRQA-shaped files

MRQA_CONTEXT_WORDS = 800  # MRQA cut every context to 800 (spaCy) tokens; TriviaQA's and SearchQA's reach it


def write_mrqa_file(out: Path, questions: int, seed: int = 0, source: Path | None = None) -> Path:
    """An MRQA file (gzipped JSON lines) shaped like TriviaQA/SearchQA: one question per context of
    about MRQA_CONTEXT_WORDS words, made of real SQuAD dev paragraphs joined with MRQA's [PAR] marker;
    real dev questions; each answer a 1-4 word span of its context at a random place (so answers fall
    into any of a context's windows). Deterministic for a seed; written by spanqa's own MRQA writer."""
    from spanqa.data.convert import write_lines
    from spanqa.data.formats import load_examples
    from spanqa.testing import shared_squad2

    examples = load_examples(source or shared_squad2("dev-v2.0.json")).examples
    paragraphs = list(dict.fromkeys(ex.context for ex in examples))
    asked = [ex.question for ex in examples]
    rng = np.random.default_rng(seed)
    lines: list[dict] = [
        {"header": {"dataset": "synthetic-long", "split": f"{questions} questions, seed {seed}"}}
    ]
    for i in range(questions):
        context = _long_context(paragraphs, rng)
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        first = int(rng.integers(0, len(words) - 4))
        start, end = words[first][0], words[first + int(rng.integers(0, 4))][1] - 1  # inclusive end
        text = context[start : end + 1]
        qa = {
            "qid": f"long-{i}",
            "question": asked[int(rng.integers(0, len(asked)))],
            "answers": [text],
            "detected_answers": [{"text": text, "char_spans": [[start, end]]}],
        }
        lines.append({"context": context, "qas": [qa]})
    return write_lines(out, lines)


def _long_context(paragraphs: list[str], rng: np.random.Generator) -> str:
    parts, words = [], 0
    while words < MRQA_CONTEXT_WORDS:
        paragraph = paragraphs[int(rng.integers(0, len(paragraphs)))]
        parts.append(paragraph)
        words += len(paragraph.split()) + 1
    text = " [PAR] ".join(parts).split()
    return " ".join(text[:MRQA_CONTEXT_WORDS])


def cached_mrqa_file(questions: int, seed: int = 0) -> Path:
    """`write_mrqa_file` of `questions` long contexts, made once under the temp dir and reused."""
    import tempfile

    out = Path(tempfile.gettempdir()) / "spanqa-bench-mrqa" / f"long-{questions}-seed{seed}.jsonl.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_mrqa_file(out, questions, seed)
    return out
