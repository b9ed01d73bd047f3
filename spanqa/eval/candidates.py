"""What answer selection consumes: the top spans and the null score of every window, whatever the head.

`WindowCandidates` is the currency; `span_candidates` makes it from the span head's start/end logits
(numpy, whole batches at once), `spanqa.eval.crf_spans.crf_candidates` from the CRF head's emissions,
and `head_candidates` picks by the model's head. Selection (`spanqa.eval.postprocess`) never needs to
know which head produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class WindowCandidates:
    """Top answer candidates of each window, on one scale so that windows and the null answer compare.

    The span head scores a span as start + end logit and the null answer as the CLS score; the CRF head
    as log p(span) and log p(all O).
    """

    scores: np.ndarray  # float32 [n_windows, k]; -inf where a window has fewer than k candidates
    starts: np.ndarray  # int32 [n_windows, k]; token index inside the window
    ends: np.ndarray  # int32 [n_windows, k]; inclusive
    null_scores: np.ndarray  # float32 [n_windows]

    def __post_init__(self) -> None:
        n, k = self.scores.shape
        if self.starts.shape != (n, k) or self.ends.shape != (n, k) or self.null_scores.shape != (n,):
            raise ValueError(
                f"candidate arrays disagree: scores {self.scores.shape}, starts {self.starts.shape}, "
                f"ends {self.ends.shape}, null_scores {self.null_scores.shape}"
            )

    @staticmethod
    def concatenate(parts: list[WindowCandidates]) -> WindowCandidates:
        """Join per-batch candidates (same k) into one set, in order."""
        return WindowCandidates(
            scores=np.concatenate([p.scores for p in parts]),
            starts=np.concatenate([p.starts for p in parts]),
            ends=np.concatenate([p.ends for p in parts]),
            null_scores=np.concatenate([p.null_scores for p in parts]),
        )


def head_candidates(model: Any, outputs: dict, context_mask: Any, n_best: int, max_answer_length: int):
    """WindowCandidates of a batch from a QAModel's outputs (torch tensors), by its head."""
    import torch

    with torch.no_grad():
        if model.head_name == "span":
            return span_candidates(
                _numpy32(outputs["start_logits"]),
                _numpy32(outputs["end_logits"]),
                context_mask.bool().cpu().numpy(),
                n_best=n_best,
                max_answer_length=max_answer_length,
            )
        from spanqa.eval.crf_spans import crf_candidates

        head = model.head
        return crf_candidates(
            head.crf, outputs["emissions"], context_mask, n_best, max_answer_length, head.tagging.states
        )


def _numpy32(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


# Windows per chunk in span_candidates: small enough that a chunk of length-sorted windows can drop the
# columns none of its windows uses, large enough that numpy's per-call overhead stays negligible.
_CHUNK_WINDOWS = 512


def span_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_mask: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> WindowCandidates:
    """The span head's best `n_best` spans per window, from padded [n_windows, L] logits.

    Spans are drawn from the `n_best` best context starts and the `n_best` best context ends (as
    transformers' run_qa does, but among context tokens only), must end at or after their start and be at
    most `max_answer_length` tokens long; a span scores start + end logit, the null answer the CLS (index 0)
    start + end logit, added in float32. Rows come out best first, -inf where a window has fewer valid spans
    than `n_best`. Equal scores go to the earlier start, then the earlier end.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    context_mask = np.asarray(context_mask, dtype=bool)
    if start_logits.ndim != 2 or not start_logits.shape == end_logits.shape == context_mask.shape:
        raise ValueError(
            f"logit/mask shapes disagree: {start_logits.shape}, {end_logits.shape}, {context_mask.shape}"
        )
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best ({n_best}) and max_answer_length ({max_answer_length}) must be >= 1")
    n, length = start_logits.shape
    out = WindowCandidates(
        scores=np.full((n, n_best), -np.inf, np.float32),
        starts=np.zeros((n, n_best), np.int32),
        ends=np.zeros((n, n_best), np.int32),
        null_scores=start_logits[:, 0].astype(np.float32) + end_logits[:, 0].astype(np.float32)
        if length
        else np.full(n, -np.inf, np.float32),
    )
    has_context = context_mask.any(axis=1)
    first = np.argmax(context_mask, axis=1)
    last = length - 1 - np.argmax(context_mask[:, ::-1], axis=1)
    # windows in order of their context span, so that each chunk is a narrow band of columns
    order = np.flatnonzero(has_context)
    order = order[np.lexsort((first[order], last[order]))]
    for i in range(0, len(order), _CHUNK_WINDOWS):
        rows = order[i : i + _CHUNK_WINDOWS]
        lo, hi = int(first[rows].min()), int(last[rows].max()) + 1
        scores, starts, ends = _chunk_candidates(
            start_logits[rows, lo:hi],
            end_logits[rows, lo:hi],
            context_mask[rows, lo:hi],
            n_best,
            max_answer_length,
        )
        out.scores[rows], out.starts[rows], out.ends[rows] = scores, starts + lo, ends + lo
    return out


def _chunk_candidates(
    start_logits: np.ndarray, end_logits: np.ndarray, context_mask: np.ndarray, n_best: int, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top spans of a chunk of windows whose columns were cut to their context band."""
    start = np.where(context_mask, start_logits.astype(np.float32, copy=False), np.float32(-np.inf))
    end = np.where(context_mask, end_logits.astype(np.float32, copy=False), np.float32(-np.inf))
    # the best starts and ends in position order: the pairs' flat order then breaks score ties by position
    top_starts, start_values = _top_k(start, n_best, by_value=False)  # [c, s]
    top_ends, end_values = _top_k(end, n_best, by_value=False)  # [c, e]
    # float32 sums, as the model's float32 logits add (and as run_qa adds them); half the bytes of float64
    # for numpy's SIMD sort in _top_k
    pair_scores = start_values[:, :, None] + end_values[:, None, :]
    span = top_ends[:, None, :] - top_starts[:, :, None]  # length - 1
    # viewed as unsigned, an end before its start is a huge length: one comparison tests both rules
    np.copyto(pair_scores, -np.inf, where=span.view(np.uint32) >= max_len)
    pair_scores = pair_scores.reshape(len(pair_scores), -1)
    best, scores = _top_k(pair_scores, n_best)
    n_ends = top_ends.shape[1]
    starts = _gather_rows(top_starts, best // n_ends)
    ends = _gather_rows(top_ends, best % n_ends)
    found = np.isfinite(scores)
    starts, ends = np.where(found, starts, 0), np.where(found, ends, 0)
    if scores.shape[1] < n_best:  # fewer columns than n_best: pad to the promised width
        pad = ((0, 0), (0, n_best - scores.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        starts, ends = np.pad(starts, pad), np.pad(ends, pad)
    return scores.astype(np.float32), starts.astype(np.int32), ends.astype(np.int32)


def _top_k(values: np.ndarray, k: int, by_value: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k largest entries of each row, largest first, ties by column
    (or, with by_value=False, in column order).

    Finds each row's k-th largest value with a plain sort (numpy's SIMD sort beats argpartition here by
    2-3x), keeps the entries above it plus the leftmost entries equal to it, then orders those k.
    Indexing goes through flat positions (one gather each) rather than take_along_axis.
    """
    values = np.ascontiguousarray(values)
    n, width = values.shape
    k = min(k, width)
    ordered = np.sort(values, axis=1)
    if np.isnan(ordered[:, -1]).any():  # sort puts NaN last
        raise ValueError("NaN among the start/end logits of context tokens (a diverged model?)")
    kth = ordered[:, width - k, None]
    chosen = values >= kth
    excess = np.flatnonzero(np.count_nonzero(chosen, axis=1) > k)
    if len(excess):  # ties at the k-th value (e.g. -inf in a window with few valid spans): leftmost win
        sub, sub_kth = values[excess], kth[excess]
        above = sub > sub_kth
        tie = sub == sub_kth
        need = k - np.count_nonzero(above, axis=1)[:, None]
        chosen[excess] = above | (tie & (np.cumsum(tie, axis=1) <= need))
    flat = np.flatnonzero(chosen).reshape(n, k)  # row-major: each row's k positions, in column order
    flat_values = values.reshape(-1)
    if by_value:
        rank = np.argsort(-flat_values[flat], axis=1, kind="stable")
        flat = flat.reshape(-1)[rank + (k * np.arange(n))[:, None]]
    columns = flat - (width * np.arange(n))[:, None]
    return columns.astype(np.int32), flat_values[flat]


def _gather_rows(table: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """table[i, columns[i, j]] for every i, j (take_along_axis through one flat gather)."""
    return table.reshape(-1)[columns + (table.shape[1] * np.arange(len(table)))[:, None]]
