"""Tokenize examples into labelled sliding windows, the way BERT's SQuAD recipe does.

Each window is `[CLS] question [SEP] context-slice [SEP]` (the special tokens are whatever the
tokenizer's own pair template uses). The question is cut to `max_query_length` tokens first; the
context is split into windows of the room left, starting every `doc_stride` tokens (SpanBERT's and
BERT's run_squad.py) or overlapping by `doc_overlap` tokens (`stride` in Hugging Face's run_qa.py).
A window is labelled with the answer's first and last token when the whole answer lies inside it,
else with the CLS index 0.

Questions and contexts are tokenized separately in large batches (the Rust tokenizer runs them in
parallel), and each distinct context only once: SQuAD asks ~5 questions per paragraph. The windows
are then cut in numpy, which gives the exact question cut that a pair call with
`truncation="only_second"` cannot give.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from spanqa.data.squad import Example
from spanqa.errors import SpanqaError

DEFAULT_OVERLAP = 128  # the reference report's windows: its tokenizer's stride
TOKENIZE_BATCH = 2048  # texts per tokenizer call: big enough for the Rust thread pool, small for the bar


@dataclass(frozen=True, kw_only=True)
class WindowSettings:
    """How questions and contexts are cut into windows: part of a window store's identity."""

    # given one way, the other way is cleared (spanqa.flags.alternatives)
    ALTERNATIVES: ClassVar[dict[str, str]] = {"doc_stride": "doc_overlap", "doc_overlap": "doc_stride"}

    max_seq_length: int = 384
    """Tokens per window (question + context + special tokens)."""
    doc_stride: int | None = None
    """Tokens between the starts of consecutive windows of a long context, as in SpanBERT's and BERT's
    run_squad.py (give this or --doc_overlap)."""
    doc_overlap: int | None = None
    """Tokens that consecutive windows of a long context share, the `stride` of Hugging Face tokenizers
    and run_qa.py (128 when neither is given)."""
    max_query_length: int = 64
    """Question tokens kept per window."""

    def __post_init__(self) -> None:
        if self.doc_stride is None and self.doc_overlap is None:
            object.__setattr__(self, "doc_overlap", DEFAULT_OVERLAP)
        self.validate()

    def validate(self, n_special: int = 3) -> None:
        """SpanqaError naming the flag; `n_special`: special tokens in the pair template ([CLS] q
        [SEP] c [SEP] has 3)."""
        if self.doc_stride is not None and self.doc_overlap is not None:
            raise SpanqaError("--doc_overlap, --doc_stride: give one of them, not both")
        for name in ("max_seq_length", "doc_stride", "doc_overlap", "max_query_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SpanqaError(f"--{name}: must be a positive integer, got {value!r}")
        room = self.max_seq_length - self.max_query_length - n_special
        if room < 1:
            raise SpanqaError(
                f"--max_seq_length: {self.max_seq_length} leaves no room for context after "
                f"--max_query_length {self.max_query_length} and {n_special} special tokens"
            )
        if self.doc_overlap is not None and self.doc_overlap >= room:
            raise SpanqaError(
                f"--doc_overlap: {self.doc_overlap} must be smaller than the context room of a window "
                f"({room} = max_seq_length {self.max_seq_length} - max_query_length "
                f"{self.max_query_length} - {n_special} special tokens)"
            )
        if self.max_seq_length > np.iinfo(np.int16).max:
            raise SpanqaError(
                f"--max_seq_length: {self.max_seq_length} does not fit the store's int16 positions"
            )

    def step(self, room: int) -> int:
        """Tokens between window starts when a window holds `room` context tokens."""
        if self.doc_stride is not None:
            return min(room, self.doc_stride)  # run_squad.py: start_offset += min(length, doc_stride)
        return room - self.doc_overlap

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a (question, context) pair."""

    prefix: tuple[int, ...]  # before the question, e.g. ([CLS],)
    middle: tuple[int, ...]  # between question and context, e.g. ([SEP],) or (</s>, </s>)
    suffix: tuple[int, ...]  # after the context, e.g. ([SEP],)
    second_type_id: int  # token_type_id of the context segment (1 for BERT, 0 for RoBERTa)

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


@dataclass
class WindowArrays:
    """The ragged window store in memory (see spanqa.data.store for the meaning of each array)."""

    input_ids: np.ndarray
    char_offsets: np.ndarray
    window_starts: np.ndarray
    window_lengths: np.ndarray
    context_start: np.ndarray
    context_end: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    ARRAYS = (
        "input_ids",
        "char_offsets",
        "window_starts",
        "window_lengths",
        "context_start",
        "context_end",
        "start_positions",
        "end_positions",
        "example_index",
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the serialized tokenizer (vocabulary, normalizer, pre-tokenizer, template).

    Truncation and padding are left out: they are per-call state (a call with `truncation=...` stores
    it in the backend), not part of what the tokenizer makes of a text.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["truncation"] = state["padding"] = None
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()


def pair_template(tokenizer: Any) -> PairTemplate:
    """Read the special tokens of a pair from the tokenizer itself, by encoding a probe pair."""
    enc = tokenizer("question", "context", add_special_tokens=True, return_token_type_ids=True)
    seq_ids = enc.sequence_ids()
    ids = enc["input_ids"]
    first = [i for i, s in enumerate(seq_ids) if s == 0]
    second = [i for i, s in enumerate(seq_ids) if s == 1]
    if not first or not second:
        raise SpanqaError("--tokenizer: the tokenizer does not encode (question, context) pairs")
    types = enc.get("token_type_ids") or [0] * len(ids)
    return PairTemplate(
        prefix=tuple(ids[: first[0]]),
        middle=tuple(ids[first[-1] + 1 : second[0]]),
        suffix=tuple(ids[second[-1] + 1 :]),
        second_type_id=int(types[second[0]]),
    )


def build_windows(
    examples: list[Example],
    tokenizer: Any,
    settings: WindowSettings,
    progress: bool = False,
) -> WindowArrays:
    template = pair_template(tokenizer)
    settings.validate(template.n_special)
    questions = _tokenize_questions(examples, tokenizer, settings.max_query_length, progress)
    contexts, context_of = _tokenize_contexts(examples, tokenizer, progress)
    return _assemble(examples, questions, contexts, context_of, template, settings, progress)


def _batches(texts: list[str], progress: bool, desc: str):
    from spanqa.progress import progress_bar

    with progress_bar(len(texts), desc, progress, unit="text") as bar:
        for i in range(0, len(texts), TOKENIZE_BATCH):
            chunk = texts[i : i + TOKENIZE_BATCH]
            yield chunk
            bar.update(len(chunk))


def _tokenize_questions(examples, tokenizer, max_query_length: int, progress: bool) -> list[list[int]]:
    texts = [ex.question for ex in examples]
    out: list[list[int]] = []
    for chunk in _batches(texts, progress, "questions"):
        enc = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=max_query_length)
        out.extend(enc["input_ids"])
    return out


@dataclass
class _Context:
    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int32 [n, 2], character span of each token in the context


def _tokenize_contexts(examples, tokenizer, progress: bool) -> tuple[list[_Context], np.ndarray]:
    index: dict[str, int] = {}
    context_of = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        context_of[i] = index.setdefault(ex.context, len(index))
    texts = list(index)
    out: list[_Context] = []
    for chunk in _batches(texts, progress, "contexts"):
        with quiet_transformers():  # long contexts are meant to exceed model_max_length: we cut windows
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            out.append(_Context(np.asarray(ids, np.int64), np.asarray(offsets, np.int32).reshape(-1, 2)))
    return out, context_of


@contextmanager
def quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def window_spans(n_context: int, room: int, step: int) -> list[tuple[int, int]]:
    """(start, length) of the windows over `n_context` tokens: `room` tokens each, starting every `step`
    tokens (the last one ends at the end of the context)."""
    spans = []
    start = 0
    while True:
        length = min(room, n_context - start)
        spans.append((start, length))
        if start + length >= n_context:
            return spans
        start += step


def answer_token_span(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """First and last context token overlapping characters [start_char, end_char)."""
    first = int(np.searchsorted(offsets[:, 1], start_char, side="right"))
    last = int(np.searchsorted(offsets[:, 0], end_char, side="left")) - 1
    return first, last


def _assemble(
    examples, questions, contexts, context_of, template: PairTemplate, settings, progress: bool = False
) -> WindowArrays:
    from spanqa.progress import tracked

    prefix = np.asarray(template.prefix, np.int64)
    middle = np.asarray(template.middle, np.int64)
    suffix = np.asarray(template.suffix, np.int64)
    pieces_ids: list[np.ndarray] = []
    pieces_offsets: list[np.ndarray] = []
    rows: list[tuple[int, int, int, int, int, int]] = []
    labelled = 0
    for ex_i, ex in enumerate(tracked(examples, "windows", progress, unit="question")):
        q = np.asarray(questions[ex_i], np.int64)
        ctx = contexts[context_of[ex_i]]
        head = np.concatenate([prefix, q, middle])
        head_offsets = np.full((len(head), 2), -1, np.int32)
        tail_offsets = np.full((len(suffix), 2), -1, np.int32)
        room = settings.max_seq_length - len(head) - len(suffix)
        answer = None
        if ex.answers:  # train on the first gold answer, as BERT does
            a = ex.answers[0]
            answer = answer_token_span(ctx.offsets, a.start, a.start + len(a.text))
        for start, length in window_spans(len(ctx.ids), room, settings.step(room)):
            pieces_ids += [head, ctx.ids[start : start + length], suffix]
            pieces_offsets += [head_offsets, ctx.offsets[start : start + length], tail_offsets]
            cstart = len(head)
            s_pos = e_pos = 0
            if answer is not None and start <= answer[0] <= answer[1] < start + length:
                s_pos, e_pos = cstart + answer[0] - start, cstart + answer[1] - start
                labelled += 1
            total = len(head) + length + len(suffix)
            rows.append((total, cstart, cstart + length - 1, s_pos, e_pos, ex_i))
    table = np.asarray(rows, np.int64).reshape(-1, 6)
    input_ids = np.concatenate(pieces_ids) if pieces_ids else np.zeros(0, np.int64)
    char_offsets = np.concatenate(pieces_offsets) if pieces_offsets else np.zeros((0, 2), np.int32)
    starts = np.zeros(len(table) + 1, np.int64)
    np.cumsum(table[:, 0], out=starts[1:])
    return WindowArrays(
        input_ids=input_ids,
        char_offsets=char_offsets.astype(np.int32),
        window_starts=starts,
        window_lengths=table[:, 0].astype(np.int16),
        context_start=table[:, 1].astype(np.int16),
        context_end=table[:, 2].astype(np.int16),
        start_positions=table[:, 3].astype(np.int16),
        end_positions=table[:, 4].astype(np.int16),
        example_index=table[:, 5].astype(np.int32),
        stats={"windows_with_answer": labelled},
    )
