"""From per-window candidates to one answer per question: selection across windows and null odds.

Everything is array work over all windows at once (one sort by example); Python only slices the chosen
answer out of each context at the end. `AnswerSettings` are the knobs, shared by training's evaluation,
the export and `spanqa predict`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spanqa.errors import SpanqaError
from spanqa.eval.candidates import WindowCandidates


@dataclass(frozen=True)
class AnswerSettings:
    """How window scores become answers: part of an exported model, read back by `spanqa predict`."""

    max_answer_length: int = 30
    """Longest answer span, in tokens, considered at prediction time."""
    n_best_size: int = 20
    """Candidate spans kept per window."""
    version_2_with_negative: bool | None = None
    """SQuAD v2: questions may have no answer. When False (v1.1), the null answer is never predicted.
    Default: from the data (on for SQuAD files, off for MRQA files, which have no unanswerable
    questions; saying it for an MRQA file is an error)."""
    null_score_diff_threshold: float | None = None
    """Predict no answer when null score − best span score exceeds this. Default: the threshold that
    reached the best --eval_metric on dev when that is best_f1/best_exact (exported with the model),
    else 0."""

    def __post_init__(self) -> None:
        for name in ("max_answer_length", "n_best_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpanqaError(f"--{name}: must be a positive integer, got {value!r}")
        if self.null_score_diff_threshold is not None and math.isnan(self.null_score_diff_threshold):
            raise SpanqaError("--null_score_diff_threshold: must be a number, got nan")

    @property
    def null_threshold(self) -> float:
        """The null-odds threshold for answer selection (0 when none is set); +inf never predicts
        "no answer" (SQuAD v1.1, MRQA). Unresolved (None, no data seen yet) counts as on, SQuAD's default."""
        if self.version_2_with_negative is False:
            return math.inf
        return 0.0 if self.null_score_diff_threshold is None else self.null_score_diff_threshold

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_answers(
    cands: WindowCandidates,
    window_indices: np.ndarray,
    store: Any,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """One answer and one null-odds value per example of `store`.

    Row r of `cands` belongs to store window `window_indices[r]`. An example's answer is its best candidate
    over all its windows; its null score is the lowest null score over its windows; null odds = null − best;
    the answer is "" when the odds exceed `null_threshold`. Examples with no window (or no valid span) get ""
    and infinite odds.
    """
    examples = store.examples()
    best = best_per_example(cands, window_indices, store, len(examples))
    texts = _answer_texts(best, store, examples)
    ids = [example.id for example in examples]
    odds = best["null_odds"].tolist()
    answers = zip(ids, odds, texts, strict=True)
    predictions = {qid: "" if o > null_threshold else text for qid, o, text in answers}
    return predictions, dict(zip(ids, odds, strict=True))


def best_per_example(
    cands: WindowCandidates, window_indices: np.ndarray, store: Any, n_examples: int
) -> dict[str, np.ndarray]:
    """Arrays over examples: the winning window, start/end token and score, the min null score, null odds."""
    window_indices = np.asarray(window_indices, dtype=np.int64)
    if window_indices.shape != (len(cands.scores),):
        raise ValueError(f"{len(window_indices)} window indices for {len(cands.scores)} candidate rows")
    rows = np.arange(len(window_indices))
    column = np.argmax(cands.scores, axis=1) if cands.scores.shape[1] else np.zeros(len(rows), np.int64)
    row_score = cands.scores[rows, column] if cands.scores.shape[1] else np.full(len(rows), -np.inf)
    example = np.asarray(store.example_index[window_indices], dtype=np.int64)

    # group rows by example, best row first within a group (lexsort is stable: earlier row wins ties)
    order = np.lexsort((-row_score.astype(np.float64), example))
    grouped = example[order]
    group_start = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(order) else np.zeros(0, int)
    winner = order[group_start]
    owner = grouped[group_start]

    out = {
        "window": np.full(n_examples, -1, np.int64),
        "start": np.zeros(n_examples, np.int64),
        "end": np.zeros(n_examples, np.int64),
        "score": np.full(n_examples, -np.inf),
        "null_score": np.full(n_examples, np.inf),
    }
    out["window"][owner] = window_indices[winner]
    out["start"][owner] = cands.starts[winner, column[winner]]
    out["end"][owner] = cands.ends[winner, column[winner]]
    out["score"][owner] = row_score[winner]
    if len(order):
        out["null_score"][owner] = np.minimum.reduceat(
            cands.null_scores[order].astype(np.float64), group_start
        )
    with np.errstate(invalid="ignore"):
        odds = out["null_score"] - out["score"]
    # no window at all (inf - -inf) or no valid span: nothing to answer with
    out["null_odds"] = np.where(np.isnan(odds) | ~np.isfinite(out["score"]), np.inf, odds)
    return out


def _answer_texts(best: dict[str, np.ndarray], store: Any, examples: list) -> list[str]:
    """Context slices of the winning spans, through the store's character offsets."""
    has_span = (best["window"] >= 0) & np.isfinite(best["score"])
    window = np.where(has_span, best["window"], 0)
    base = np.asarray(store.window_starts[window], dtype=np.int64)
    first = np.asarray(store.char_offsets[base + best["start"], 0], dtype=np.int64)
    last = np.asarray(store.char_offsets[base + best["end"], 1], dtype=np.int64)
    usable = has_span & (first >= 0)
    first, last = np.where(usable, first, 0).tolist(), np.where(usable, last, 0).tolist()
    return [ex.context[lo:hi] for ex, lo, hi in zip(examples, first, last, strict=True)]
