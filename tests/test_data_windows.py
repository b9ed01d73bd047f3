"""Windows and their labels (spanqa.data.windows): the BERT SQuAD recipe, and answers mapping back to text."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from spanqa.data.prepare import prepare
from spanqa.data.squad import Answer, Example
from spanqa.data.store import WindowStore
from spanqa.data.windows import WindowSettings, answer_token_span, build_windows, window_spans
from spanqa.testing import shared_squad2

CASES = [(1, 10, 3), (10, 10, 3), (11, 10, 3), (100, 17, 5), (57, 8, 7), (1000, 317, 128), (40, 8, 20)]


@pytest.mark.parametrize("n, room, overlap", [c for c in CASES if c[2] < c[1]])
def test_doc_overlap_windows_overlap_by_exactly_that_many_tokens(n, room, overlap):
    spans = window_spans(n, room, WindowSettings(doc_overlap=overlap, max_query_length=1).step(room))
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == n
    assert all(0 < length <= room for _, length in spans)
    for (s0, l0), (s1, _) in zip(spans, spans[1:], strict=False):
        assert l0 == room and s0 + l0 - s1 == overlap  # consecutive windows overlap by exactly `overlap`


def run_squad_doc_spans(n_context: int, max_tokens_for_doc: int, doc_stride: int) -> list[tuple[int, int]]:
    """SpanBERT's (and BERT's) run_squad.py window loop, re-implemented from its source as a reference."""
    spans, start_offset = [], 0
    while start_offset < n_context:
        length = min(n_context - start_offset, max_tokens_for_doc)
        spans.append((start_offset, length))
        if start_offset + length == n_context:
            break
        start_offset += min(length, doc_stride)
    return spans


@pytest.mark.parametrize("n, room, stride", CASES)
def test_doc_stride_gives_run_squads_windows(n, room, stride):
    settings = WindowSettings(doc_stride=stride, max_query_length=1)
    assert window_spans(n, room, settings.step(room)) == run_squad_doc_spans(n, room, stride)


def test_spanbert_recipe_windows_start_every_128_tokens(minilm_tokenizer):
    """The spanbert preset's windows (512, doc_stride 128) are run_squad.py's, token for token."""
    context = " ".join(f"w{i}" for i in range(2000))
    ex = Example("q", "t", "Which word?", context, (), True)
    settings = WindowSettings(max_seq_length=512, doc_stride=128, max_query_length=64)
    arrays = build_windows([ex], minilm_tokenizer, settings)
    n_context = len(minilm_tokenizer(context, add_special_tokens=False)["input_ids"])
    question = len(minilm_tokenizer("Which word?", add_special_tokens=False)["input_ids"])
    expected = run_squad_doc_spans(n_context, 512 - question - 3, 128)
    lengths = (arrays.context_end - arrays.context_start + 1).tolist()
    assert lengths == [length for _, length in expected] and len(expected) > 3


def test_same_windows_as_the_tokenizer_pair_call(tiny_store, minilm_tokenizer, tiny_settings):
    """Where the question is not cut, the windows equal the Hugging Face overflowing pair encoding."""
    examples = tiny_store.examples()
    enc = minilm_tokenizer(
        [ex.question for ex in examples],
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=tiny_settings["max_seq_length"],
        stride=tiny_settings["doc_overlap"],
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    theirs: dict[int, list] = {}
    for row, ex_i in enumerate(enc["overflow_to_sample_mapping"]):
        theirs.setdefault(ex_i, []).append(row)
    compared = 0
    for w in range(len(tiny_store)):
        ex_i = int(tiny_store.example_index[w])
        rank_in_example = w - int(np.searchsorted(tiny_store.example_index, ex_i))
        row = theirs[ex_i][rank_in_example]
        assert list(tiny_store.window(w)["input_ids"]) == enc["input_ids"][row]
        context = [i for i, s in enumerate(enc.sequence_ids(row)) if s == 1]
        ours = tiny_store.offsets(w)
        assert [tuple(ours[i]) for i in context] == [tuple(enc["offset_mapping"][row][i]) for i in context]
        compared += 1
    assert compared == len(tiny_store) and len(tiny_store) > len(examples)


def test_question_is_cut_to_max_query_length(minilm_tokenizer):
    question = " ".join(f"word{i}" for i in range(80))
    context = "Paris is the capital of France. " * 40
    ex = Example("q", "t", question, context, (Answer("France", context.rindex("France")),), False)
    settings = WindowSettings(max_seq_length=128, doc_overlap=32, max_query_length=20)
    arrays = build_windows([ex], minilm_tokenizer, settings)
    full_question = minilm_tokenizer(question, add_special_tokens=False)["input_ids"]
    assert len(full_question) > 20
    for w in range(len(arrays.window_lengths)):
        ids = arrays.input_ids[arrays.window_starts[w] : arrays.window_starts[w + 1]]
        assert arrays.context_start[w] == 1 + 20 + 1
        assert list(ids[1:21]) == full_question[:20]
        assert len(ids) <= 128
    # the answer (last occurrence) is labelled in the last window only
    labelled = np.flatnonzero(arrays.start_positions)
    assert list(labelled) == [len(arrays.window_lengths) - 1]


def test_answer_token_span():
    offsets = np.array([[0, 5], [6, 8], [9, 12], [12, 13]])  # "Paris is the. "
    assert answer_token_span(offsets, 0, 5) == (0, 0)
    assert answer_token_span(offsets, 6, 12) == (1, 2)
    assert answer_token_span(offsets, 10, 13) == (2, 3)  # starts inside a token: the token is taken


def classify_labelled_spans(store: WindowStore) -> Counter:
    """Compare each labelled window's span, mapped back through the stored char offsets, with its answer.

    Categories:
    - "exact": the characters of the labelled tokens are exactly the answer text;
    - "inside a token": the answer starts or ends inside a WordPiece token (e.g. "south" in "southern",
      or dev answers whose answer_start points at a first occurrence inside a longer number, "6,000" in
      "26,000"); token labels can only cover whole tokens, so the span is the answer widened to the token
      boundaries: it equals prefix + answer + suffix where prefix and suffix hold no whitespace.
      The answer itself is compared after strip(): offsets never cover whitespace, so an answer text
      with a leading or trailing space cannot be reproduced and that space carries no meaning.
    Anything else is "wrong".
    Also checks that each answerable example's windows that do NOT hold a label do not contain the
    answer's character range, and that every answerable example has at least one labelled window.
    """
    examples = store.examples()
    found: Counter = Counter()
    labelled_examples = set()
    for w in range(len(store)):
        ex = examples[int(store.example_index[w])]
        if not ex.answers:
            assert store.start_positions[w] == store.end_positions[w] == 0
            continue
        answer = ex.answers[0]
        text = answer.text.strip()
        a_start = answer.start + answer.text.index(text)
        offsets = store.offsets(w)
        cs, ce = int(store.context_start[w]), int(store.context_end[w])
        s, e = int(store.start_positions[w]), int(store.end_positions[w])
        if s == 0:
            inside = offsets[cs][0] <= a_start and offsets[ce][1] >= a_start + len(text)
            assert not inside, f"window {w} contains the answer of {ex.id} but is not labelled"
            continue
        assert cs <= s <= e <= ce
        labelled_examples.add(ex.id)
        span = ex.context[offsets[s][0] : offsets[e][1]]
        if span == text:
            found["exact"] += 1
            continue
        cut = span.find(text)
        prefix, suffix = span[:cut], span[cut + len(text) :]
        if cut >= 0 and not any(c.isspace() for c in prefix + suffix):
            found["inside a token"] += 1
        else:
            found["wrong"] += 1
    assert labelled_examples == {ex.id for ex in examples if ex.answers}
    return found


def test_labelled_spans_map_back_to_the_answers_tiny(tiny_store):
    found = classify_labelled_spans(tiny_store)
    assert found["wrong"] == 0 and found["exact"] > 0


@pytest.mark.parametrize("name", ["dev-v2.0.json", "train-v2.0.first10articles.json"])
def test_labelled_spans_map_back_to_the_answers_real_squad(name, tmp_path, minilm_tokenizer):
    """Every answerable question of the real files, 384/128/64 (~5 s each: prepare is fast)."""
    path = shared_squad2(name)
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    store = prepare(path, minilm_tokenizer, tmp_path / "store", progress=False)
    found = classify_labelled_spans(store)
    # measured with the MiniLM (uncased WordPiece) tokenizer, categories as in the docstring above:
    # dev 5,953 labelled windows: 5,933 exact, 20 inside a token; train (10 articles) 4,387: 4,358 and 29
    assert found["wrong"] == 0
    assert found["inside a token"] <= 0.01 * found["exact"]
