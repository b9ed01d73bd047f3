"""The CRF head's tag schemes (spanqa.model.tagging): the constrained CRF against brute-force
enumeration of the allowed paths and against pytorch-crf with the forbidden entries at -inf, the gold
tags, and the exact span log-probabilities (spanqa.eval.crf_spans) of every scheme."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchcrf

from spanqa.eval.crf_spans import crf_candidates, span_log_probs
from spanqa.model import CRF_TAGGINGS
from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O
from spanqa.model.heads import CRFHead
from spanqa.model.tagging import TAG_E, TAG_O_AFTER, TAG_S, TAGGINGS, SpanStates, Tagging

NEG_INF = float("-inf")


def block_mask(starts: list[int], lengths: list[int], length: int) -> torch.Tensor:
    pos = torch.arange(length).view(1, -1)
    s, n = torch.tensor(starts).view(-1, 1), torch.tensor(lengths).view(-1, 1)
    return (pos >= s) & (pos < s + n)


def random_crf(tagging: Tagging, seed: int, scale: float = 2.0) -> CRF:
    torch.manual_seed(seed)
    crf = tagging.crf().double()
    with torch.no_grad():
        for p in crf.parameters():
            p.uniform_(-scale, scale)
    return crf


def allowed(tagging: Tagging):
    """(start [K], transitions [K][K], end [K]) of the scheme as plain bools (True where unconstrained)."""
    k = tagging.num_tags
    return (
        tagging.allowed_start or (True,) * k,
        tagging.allowed_transitions or ((True,) * k,) * k,
        tagging.allowed_end or (True,) * k,
    )


def enumerate_paths(crf: CRF, tagging: Tagging, emissions: torch.Tensor, mask: torch.Tensor, b: int):
    """Every allowed path of row b over its active positions with its score (the parameters read
    directly, the constraints from the scheme's tables: nothing of the CRF's own masking)."""
    ok_start, ok_trans, ok_end = allowed(tagging)
    start, end, trans = (p.detach() for p in (crf.start_transitions, crf.end_transitions, crf.transitions))
    idx = mask[b].nonzero().flatten().tolist()
    if not idx:
        return idx, []
    paths = []
    for path in itertools.product(range(crf.num_tags), repeat=len(idx)):
        if not (
            ok_start[path[0]]
            and ok_end[path[-1]]
            and all(ok_trans[a][c] for a, c in itertools.pairwise(path))
        ):
            continue
        s = (
            start[path[0]]
            + end[path[-1]]
            + sum(emissions[b, pos, y] for pos, y in zip(idx, path, strict=True))
        )
        s = s + sum(trans[a, c] for a, c in itertools.pairwise(path))
        paths.append((path, float(s)))
    return idx, paths


def span_path(n: int, i: int, j: int, states: SpanStates) -> tuple[int, ...]:
    st = states
    answer = (st.single,) if i == j else (st.begin,) + (st.inside,) * (j - i - 1) + (st.end,)
    return (st.before,) * i + answer + (st.after,) * (n - j - 1)


# ----------------------------------------------------------------------------- the schemes
def test_the_flag_choices_are_the_schemes():
    assert set(CRF_TAGGINGS) == set(TAGGINGS)
    assert all(name == tagging.name for name, tagging in TAGGINGS.items())


def test_gold_tags_of_each_scheme():
    context = block_mask([5, 5, 3], [10, 10, 4], 16)
    starts, ends = torch.tensor([7, 0, 6]), torch.tensor([9, 0, 6])
    bio = TAGGINGS["bio"].tags(starts, ends, context)
    assert bio[0].tolist() == [TAG_O] * 7 + [TAG_B, TAG_I, TAG_I] + [TAG_O] * 6
    assert (bio[1] == TAG_O).all() and bio[2].tolist() == [TAG_O] * 6 + [TAG_B] + [TAG_O] * 9
    assert torch.equal(TAGGINGS["bio_masked"].tags(starts, ends, context), bio)
    span = TAGGINGS["span"].tags(starts, ends, context)
    # O-after only on context tokens after the answer; padding and question tokens stay O
    assert span[0].tolist() == [TAG_O] * 7 + [TAG_B, TAG_I, TAG_I] + [TAG_O_AFTER] * 5 + [TAG_O]
    assert (span[1] == TAG_O).all()
    assert span[2].tolist() == [TAG_O] * 6 + [TAG_B] + [TAG_O] * 9  # the answer ends the context
    ends_apart = TAGGINGS["span_end"].tags(starts, ends, context)
    assert ends_apart[0].tolist() == [TAG_O] * 7 + [TAG_B, TAG_I, TAG_E] + [TAG_O_AFTER] * 5 + [TAG_O]
    assert (ends_apart[1] == TAG_O).all()
    assert ends_apart[2].tolist() == [TAG_O] * 6 + [TAG_S] + [TAG_O] * 9  # a one-token answer
    for name, tags in (("span", span), ("span_end", ends_apart)):
        ok_start, ok_trans, ok_end = allowed(TAGGINGS[name])
        for row, (first, n) in enumerate(((5, 10), (5, 10), (3, 4))):
            path = tuple(tags[row, first : first + n].tolist())
            assert ok_start[path[0]] and ok_end[path[-1]], (name, row)
            assert all(ok_trans[a][c] for a, c in itertools.pairwise(path)), (name, row)


def test_the_span_scheme_shares_one_o_emission_before_and_after_the_answer():
    head = CRFHead(8, tags="span").eval()
    hidden = torch.randn(2, 5, 8)
    emissions = head(hidden, torch.ones(2, 5), torch.ones(2, 5))["emissions"]
    assert head.emission.out_features == 3 and emissions.shape == (2, 5, 4)
    torch.testing.assert_close(emissions[..., TAG_O_AFTER], emissions[..., TAG_O])
    with pytest.raises(ValueError, match="unknown CRF tag scheme 'bioes'"):
        CRFHead(8, tags="bioes")


def test_the_span_end_scheme_scores_a_one_token_answer_by_its_start_and_end_emissions():
    head = CRFHead(8, tags="span_end").eval()
    hidden = torch.randn(2, 5, 8)
    raw = head.emission(hidden)
    emissions = head(hidden, torch.ones(2, 5), torch.ones(2, 5))["emissions"]
    assert head.emission.out_features == 4 and emissions.shape == (2, 5, 6)
    torch.testing.assert_close(emissions[..., :3], raw[..., :3])
    torch.testing.assert_close(emissions[..., TAG_O_AFTER], raw[..., TAG_O])
    torch.testing.assert_close(emissions[..., TAG_E], raw[..., 3])
    torch.testing.assert_close(emissions[..., TAG_S], raw[..., TAG_B] + raw[..., 3])


# ----------------------------------------------------------------------------- the constrained CRF
@pytest.mark.parametrize("name", ["bio_masked", "span", "span_end"])
def test_constrained_crf_matches_brute_force_over_the_allowed_paths(name):
    tagging = TAGGINGS[name]
    crf = random_crf(tagging, seed=1)
    length = 6
    mask = block_mask([0, 2, 5, 1], [6, 4, 1, 5], length)
    emissions = torch.randn(4, length, tagging.num_tags, dtype=torch.float64) * 2
    tags = tagging.tags(torch.tensor([1, 3, 0, 2]), torch.tensor([3, 3, 0, 5]), mask)
    log_z = crf.log_partition(emissions, mask)
    llh = crf(emissions, tags, mask, reduction="none")
    marginals = crf.marginals(emissions, mask)
    score, best = crf.viterbi(emissions, mask)
    for b in range(4):
        idx, paths = enumerate_paths(crf, tagging, emissions, mask, b)
        scores = torch.tensor([s for _, s in paths], dtype=torch.float64)
        expected_z = float(scores.logsumexp(0))
        assert float(log_z[b]) == pytest.approx(expected_z, abs=1e-9)
        gold = dict(paths)[tuple(tags[b, idx].tolist())]
        assert float(llh[b]) == pytest.approx(gold - expected_z, abs=1e-9)
        expected_marg = torch.zeros(length, tagging.num_tags, dtype=torch.float64)
        for path, s in paths:
            for pos, y in zip(idx, path, strict=True):
                expected_marg[pos, y] += math.exp(s - expected_z)
        torch.testing.assert_close(marginals[b], expected_marg, atol=1e-9, rtol=0)
        top_path, top = max(paths, key=lambda p: p[1])
        assert float(score[b]) == pytest.approx(top, abs=1e-9)
        assert tuple(best[b, idx].tolist()) == top_path


@pytest.mark.parametrize("name", ["bio_masked", "span", "span_end"])
def test_constrained_crf_matches_pytorch_crf_with_forbidden_entries_at_minus_infinity(name):
    tagging = TAGGINGS[name]
    ours = random_crf(tagging, seed=2)
    ref = torchcrf.CRF(tagging.num_tags, batch_first=True).double()
    ok_start, ok_trans, ok_end = allowed(tagging)
    with torch.no_grad():
        ref.start_transitions.copy_(ours.start_transitions.masked_fill(~torch.tensor(ok_start), NEG_INF))
        ref.transitions.copy_(ours.transitions.masked_fill(~torch.tensor(ok_trans), NEG_INF))
        ref.end_transitions.copy_(ours.end_transitions.masked_fill(~torch.tensor(ok_end), NEG_INF))
    length = 40
    # row 3's answer ends the row, except under span_end: its padding would be E -> E, forbidden
    lengths = torch.tensor([40, 23, 1, 10 if name == "span_end" else 9])
    mask = torch.arange(length).view(1, -1) < lengths.view(-1, 1)  # pytorch-crf takes prefix masks
    emissions = torch.randn(4, length, tagging.num_tags, dtype=torch.float64) * 3
    tags = tagging.tags(torch.tensor([5, 2, 0, 7]), torch.tensor([9, 2, 0, 8]), mask)
    # pytorch-crf scores padding as transition x 0, which is nan at -inf: pad with the last active tag
    last = tags.gather(1, (lengths - 1).view(-1, 1))
    tags = torch.where(mask, tags, last)
    torch.testing.assert_close(
        ours(emissions, tags, mask, reduction="none"), ref(emissions, tags, mask, reduction="none")
    )
    assert ours.decode(emissions, mask) == ref.decode(emissions, mask)


def test_forbidden_entries_get_no_gradient_and_survive_weight_decay():
    tagging = TAGGINGS["span"]
    crf = random_crf(tagging, seed=3)
    optimizer = torch.optim.AdamW(crf.parameters(), lr=0.5, weight_decay=0.1)
    emissions = torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True)
    mask = block_mask([0, 2, 0], [6, 5, 1], 8)
    tags = tagging.tags(torch.tensor([2, 4, 0]), torch.tensor([5, 4, 0]), mask)
    for _ in range(3):
        optimizer.zero_grad()
        (-crf(emissions, tags, mask, reduction="mean")).backward()
        forbidden = ~torch.tensor(allowed(tagging)[1])
        assert (crf.transitions.grad[forbidden] == 0).all() and torch.isfinite(crf.transitions.grad).all()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in crf.parameters()) and torch.isfinite(emissions.grad).all()
    assert "transition_mask" not in crf.state_dict()  # the scheme's, not the weights'
    _, paths = enumerate_paths(crf, tagging, emissions.detach(), mask, 0)
    assert float(crf.log_partition(emissions.detach(), mask)[0]) == pytest.approx(
        float(torch.tensor([s for _, s in paths], dtype=torch.float64).logsumexp(0)), abs=1e-9
    )


def test_constraints_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"transition_mask: allowed entries must be \[3, 3\], got \[3, 4\]"):
        CRF(3, allowed_transitions=torch.ones(3, 4, dtype=torch.bool))
    assert not CRF(3).constrained and TAGGINGS["span"].crf().constrained


# ----------------------------------------------------------------------------- span probabilities
@pytest.mark.parametrize("name", list(TAGGINGS))
def test_span_log_probs_match_brute_force(name):
    tagging = TAGGINGS[name]
    crf = random_crf(tagging, seed=4)
    length, max_len = 7, 4
    mask = block_mask([2, 0, 4, 6, 3], [5, 6, 3, 1, 0], length)
    emissions = torch.randn(5, length, tagging.num_tags, dtype=torch.float64) * 2
    spans, null = span_log_probs(crf, emissions, mask, max_len, tagging.states)
    for b in range(5):
        idx, paths = enumerate_paths(crf, tagging, emissions, mask, b)
        if not idx:
            assert null[b] == 0.0 and (spans[b] == NEG_INF).all()
            continue
        scores, log_z = (
            dict(paths),
            float(torch.tensor([s for _, s in paths], dtype=torch.float64).logsumexp(0)),
        )
        before = tagging.states.before
        assert float(null[b]) == pytest.approx(scores[(before,) * len(idx)] - log_z, abs=1e-9)
        for i, a in itertools.product(range(length), range(max_len)):
            k, j = i - idx[0], i - idx[0] + a
            if k >= 0 and j < len(idx):
                expected = scores[span_path(len(idx), k, j, tagging.states)] - log_z
                assert float(spans[b, i, a]) == pytest.approx(expected, abs=1e-9), (b, i, a)
            else:
                assert spans[b, i, a] == NEG_INF


@pytest.mark.parametrize("name", ["span", "span_end"])
def test_under_the_one_span_schemes_no_answer_and_the_spans_are_all_the_probability(name):
    tagging = TAGGINGS[name]
    crf = random_crf(tagging, seed=5, scale=3.0)
    length = 30
    mask = block_mask([0, 4, 29], [30, 20, 1], length)
    emissions = torch.randn(3, length, tagging.num_tags, dtype=torch.float64) * 3
    spans, null = span_log_probs(crf, emissions, mask, length, tagging.states)
    total = torch.logaddexp(spans.flatten(1).logsumexp(1), null)
    torch.testing.assert_close(total, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    emissions = emissions[..., :3]
    bio = TAGGINGS["bio"]
    spans, null = span_log_probs(random_crf(bio, 5), emissions, mask, length, bio.states)
    assert (torch.logaddexp(spans.flatten(1).logsumexp(1), null) < -1e-3).all()  # other paths exist


def test_crf_candidates_of_the_span_scheme_are_its_top_spans():
    tagging = TAGGINGS["span"]
    crf = random_crf(tagging, seed=6)
    emissions = torch.randn(2, 40, 4, dtype=torch.float64)
    mask = block_mask([10, 0], [30, 40], 40)
    spans, null = span_log_probs(crf, emissions, mask, 5, tagging.states)
    cands = crf_candidates(crf, emissions, mask, n_best=7, max_answer_length=5, states=tagging.states)
    for b in range(2):
        top = spans[b].flatten().topk(7)
        torch.testing.assert_close(torch.from_numpy(cands.scores[b]).double(), top.values, atol=1e-5, rtol=0)
        assert cands.starts[b].tolist() == (top.indices // 5).tolist()
        assert (cands.ends[b] - cands.starts[b]).tolist() == (top.indices % 5).tolist()
    torch.testing.assert_close(torch.from_numpy(cands.null_scores).double(), null, atol=1e-5, rtol=0)


def test_span_log_probs_refuse_states_the_crf_has_not():
    with pytest.raises(ValueError, match=r"num_tags=3 has no tags \(0, 1, 2, 2, 1, 3\)"):
        span_log_probs(
            CRF(3), torch.randn(1, 4, 3), torch.ones(1, 4, dtype=torch.bool), 3, TAGGINGS["span"].states
        )
