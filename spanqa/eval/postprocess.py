"""From per-window scores to one answer per question: n-best span search, selection across windows, null odds.

Everything is array work over whole batches of windows (numpy broadcasting of the n_best × n_best start/end
pairs, then one sort by example); Python only slices the chosen answer out of each context at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spanqa.eval.candidates import WindowCandidates

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


def nbest_answers(
    cands: WindowCandidates, window_indices: np.ndarray, store: Any, n: int = 20
) -> dict[str, list[dict]]:
    """Up to `n` best candidates per example over all its windows: text, score, character span.

    For inspection (the n-best file); the null answer is reported by the null odds, not listed here.
    """
    examples = store.examples()
    window_indices = np.asarray(window_indices, dtype=np.int64)
    k = cands.scores.shape[1]
    flat_score = cands.scores.reshape(-1).astype(np.float64)
    flat_window = np.repeat(window_indices, k)
    flat_example = np.asarray(store.example_index[flat_window], dtype=np.int64)
    idx = np.flatnonzero(np.isfinite(flat_score))
    order = idx[np.lexsort((-flat_score[idx], flat_example[idx]))]
    out: dict[str, list[dict]] = {ex.id: [] for ex in examples}
    if not len(order):
        return out
    grouped = flat_example[order]
    rank = np.arange(len(order)) - np.maximum.accumulate(
        np.where(np.r_[True, grouped[1:] != grouped[:-1]], np.arange(len(order)), 0)
    )
    order = order[rank < n]
    base = np.asarray(store.window_starts[flat_window[order]], dtype=np.int64)
    first = np.asarray(store.char_offsets[base + cands.starts.reshape(-1)[order], 0], dtype=np.int64)
    last = np.asarray(store.char_offsets[base + cands.ends.reshape(-1)[order], 1], dtype=np.int64)
    for j, flat in enumerate(order.tolist()):
        ex = examples[flat_example[flat]]
        out[ex.id].append(
            {
                "text": ex.context[first[j] : last[j]],
                "score": float(flat_score[flat]),
                "start_char": int(first[j]),
                "end_char": int(last[j]),
            }
        )
    return out
