"""On hand-made logits: the span head's search per window (spanqa.eval.candidates) and the selection
across windows (spanqa.eval.postprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spanqa.data.windows import WindowSettings
from spanqa.eval.candidates import WindowCandidates, span_candidates
from spanqa.eval.postprocess import select_answers


def one_window(start, end, context):
    mask = np.zeros(len(start), bool)
    mask[context[0] : context[1] + 1] = True
    return np.array([start], np.float32), np.array([end], np.float32), mask[None]


# CLS, two question tokens (1, 2) holding the largest logits, context 3..8, one padding token
START = [1, 9, 0, 0, 3, 0, 0, 0, 0, 0]
END = [1, 0, 9, 0, 0, 0, 2, 0, 0, 0]


def spans(cands: WindowCandidates, row: int = 0, n: int = 4) -> list[tuple[int, int, float]]:
    triples = zip(cands.starts[row], cands.ends[row], cands.scores[row], strict=True)
    return [(int(s), int(e), float(v)) for s, e, v in triples][:n]


def test_best_span_uses_context_only():
    cands = span_candidates(*one_window(START, END, (3, 8)))
    assert spans(cands, n=1) == [(4, 6, 5.0)]  # the question tokens' 9s are never used
    assert cands.null_scores.tolist() == [2.0]
    assert cands.scores.dtype == np.float32 and cands.starts.dtype == np.int32
    assert np.all(np.diff(cands.scores[0]) <= 0)  # best first


def test_max_answer_length_and_tie_order():
    cands = span_candidates(*one_window(START, END, (3, 8)), max_answer_length=2)
    # (4, 6) is 3 tokens long; equal scores go to the earlier start, then the earlier end
    assert spans(cands) == [(4, 4, 3.0), (4, 5, 3.0), (5, 6, 2.0), (6, 6, 2.0)]
    assert np.all(cands.ends - cands.starts < 2)


def test_end_never_before_start():
    start = [0, 0, 0, 0, 0, 0, 5, 0]  # best start after the best end
    end = [0, 0, 0, 5, 0, 0, 0, 0]
    cands = span_candidates(*one_window(start, end, (1, 7)), n_best=30)
    finite = np.isfinite(cands.scores[0])
    assert np.all(cands.ends[0][finite] >= cands.starts[0][finite])
    assert spans(cands, n=1)[0][2] == 5.0  # 5 + 0: the two 5s never pair up
    assert finite.sum() == 7 * 8 // 2  # every span of 7 context tokens, nothing more


def test_short_and_empty_context_pad_with_minus_inf():
    start, end, mask = one_window(START, END, (3, 4))
    mask = np.concatenate([mask, np.zeros_like(mask)])  # a second window without context
    cands = span_candidates(np.repeat(start, 2, 0), np.repeat(end, 2, 0), mask, n_best=20)
    assert cands.scores.shape == (2, 20)
    assert spans(cands, n=3) == [(4, 4, 3.0), (3, 3, 0.0), (3, 4, 0.0)]
    assert np.all(np.isneginf(cands.scores[0, 3:])) and np.all(np.isneginf(cands.scores[1]))


def reference_candidates(start, end, mask, n_best, max_len):
    """The definition, one window at a time in plain Python."""
    rows = []
    for s_row, e_row, m_row in zip(start.tolist(), end.tolist(), mask, strict=True):
        context = np.flatnonzero(m_row).tolist()
        top_s = sorted(context, key=lambda i: (-s_row[i], i))[:n_best]
        top_e = sorted(context, key=lambda i: (-e_row[i], i))[:n_best]
        pairs = [
            (float(np.float32(s_row[s]) + np.float32(e_row[e])), s, e)  # float32 sums, like the model's
            for s in top_s
            for e in top_e
            if s <= e and e - s + 1 <= max_len
        ]
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))  # equal scores: earlier start, then earlier end
        rows.append(pairs[:n_best])
    return rows


def test_matches_the_definition_across_chunks():
    rng = np.random.default_rng(7)
    n, length = 1100, 40  # more than one chunk of windows, ragged contexts, some ties
    start = rng.normal(size=(n, length)).astype(np.float32)
    end = np.round(rng.normal(size=(n, length)), 1).astype(np.float32)
    lo = rng.integers(1, 20, n)
    hi = np.minimum(lo + rng.integers(0, 25, n), length - 1)
    mask = (np.arange(length) >= lo[:, None]) & (np.arange(length) <= hi[:, None])
    cands = span_candidates(start, end, mask, n_best=5, max_answer_length=4)
    for row, expected in enumerate(reference_candidates(start, end, mask, 5, 4)):
        got = [
            (float(v), int(s), int(e))
            for v, s, e in zip(cands.scores[row], cands.starts[row], cands.ends[row], strict=True)
        ]
        assert got[: len(expected)] == expected, row
        assert all(np.isneginf(v) for v, _, _ in got[len(expected) :])


# ---- selection across windows, with a real window store --------------------------------------------------

CONTEXT = (
    "Paris is the capital and most populous city of France. "
    "It has been one of the major centres of finance, diplomacy, commerce, fashion and science. "
    "The river that flows through the city is called the Seine, and its banks are a World Heritage Site."
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from spanqa.data.prepare import prepare
    from spanqa.testing import minilm_dir

    root = tmp_path_factory.mktemp("eval_store")
    seine = {"text": "Seine", "answer_start": CONTEXT.index("Seine")}
    qas = [
        {"id": "river", "question": "Which river?", "answers": [seine]},
        {"id": "moon", "question": "Who walked on the moon?", "answers": [], "is_impossible": True},
    ]
    data = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}
    (root / "tiny.json").write_text(json.dumps(data))
    return prepare(
        root / "tiny.json",
        str(minilm_dir()),
        root / "store",
        WindowSettings(max_seq_length=32, doc_overlap=8, max_query_length=8),
        progress=False,
    )


def windows_of(store, example: int) -> list[int]:
    return np.flatnonzero(np.asarray(store.example_index) == example).tolist()


def token_at(store, window: int, char: int) -> int:
    return int(np.flatnonzero(store.offsets(window)[:, 0] == char)[0])


def planted_logits(store, plants: dict[int, list[tuple[int, int, float]]]):
    """Padded logits: context tokens -5, CLS 0, and (start token, end token, logit) planted per window."""
    n, length = len(store), int(np.max(store.window_lengths))
    start = np.full((n, length), -5.0, np.float32)
    end = start.copy()
    start[:, 0] = end[:, 0] = 0.0
    for w, items in plants.items():
        for s, e, value in items:
            start[w, s], end[w, e] = value, value
    positions = np.arange(length)
    mask = (positions >= store.context_start[:, None]) & (positions <= store.context_end[:, None])
    return start, end, mask


def test_best_window_wins_and_null_odds(store):
    river = windows_of(store, 0)
    assert len(river) >= 3, "the fixture must span several windows"
    seine = CONTEXT.index("Seine")
    last = next(w for w in reversed(river) if (store.offsets(w)[:, 0] == seine).any())
    paris = next(w for w in river if (store.offsets(w)[:, 0] == 0).any())
    t_seine, t_paris = token_at(store, last, seine), token_at(store, paris, 0)
    start, end, mask = planted_logits(
        store, {paris: [(t_paris, t_paris, 2.0)], last: [(t_seine, t_seine, 5.0)]}
    )
    start[river[1], 0] = -1.0  # this window's null score (-1) is the lowest of the question's windows

    order = np.random.default_rng(0).permutation(len(store))  # rows come in any order
    cands = span_candidates(start[order], end[order], mask[order])
    predictions, null_odds = select_answers(cands, order, store)
    assert predictions["river"] == "Seine"
    assert null_odds["river"] == -1.0 - 10.0
    # the unanswerable question only has -5 + -5 spans against a null score of 0: odds 10 -> ""
    assert predictions["moon"] == "" and null_odds["moon"] == 10.0

    strict, _ = select_answers(cands, order, store, null_threshold=-12.0)
    assert strict["river"] == ""


def test_example_without_windows_gets_no_answer(store):
    start, end, mask = planted_logits(store, {})
    rows = np.array(windows_of(store, 1))  # evaluate only the second question's windows
    predictions, null_odds = select_answers(span_candidates(start[rows], end[rows], mask[rows]), rows, store)
    assert predictions == {"river": "", "moon": ""}
    assert null_odds["river"] == float("inf")
    nothing = span_candidates(start[:0], end[:0], mask[:0])
    assert select_answers(nothing, rows[:0], store)[0] == {"river": "", "moon": ""}


def test_bad_logits_are_refused():
    start, end, mask = one_window(START, END, (3, 8))
    with pytest.raises(ValueError, match="shapes disagree"):
        span_candidates(start, end[:, :5], mask)
    start[0, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        span_candidates(start, end, mask)
