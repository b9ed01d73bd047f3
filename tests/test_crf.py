"""spanqa's CRF against pytorch-crf, brute-force enumeration and autograd; the CRF head's BIO tags and
its span candidates (spanqa.eval.crf_spans) against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchcrf

from spanqa.eval.crf_spans import crf_candidates
from spanqa.model import crf as crf_module
from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O
from spanqa.model.heads import bio_tags


def make_pair(num_tags: int, seed: int, scale: float = 1.0) -> tuple[torchcrf.CRF, CRF]:
    torch.manual_seed(seed)
    ref = torchcrf.CRF(num_tags, batch_first=True).double()
    with torch.no_grad():
        for p in ref.parameters():  # pytorch-crf's init is tiny; make transitions matter
            p.uniform_(-scale, scale)
    ours = CRF(num_tags).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def prefix_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length  # pytorch-crf's time-major loop needs one full row
    return torch.arange(length).view(1, -1) < lengths.view(-1, 1)


def block_mask(starts: list[int], lengths: list[int], length: int) -> torch.Tensor:
    pos = torch.arange(length).view(1, -1)
    s, n = torch.tensor(starts).view(-1, 1), torch.tensor(lengths).view(-1, 1)
    return (pos >= s) & (pos < s + n)


def brute_force(crf: CRF, emissions: torch.Tensor, mask: torch.Tensor):
    """Per row: log Z, marginals [T, K], best score, best path, and a scorer, by enumeration."""
    start, end, trans = (p.detach() for p in (crf.start_transitions, crf.end_transitions, crf.transitions))
    results = []
    for b in range(emissions.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()

        def score(path, b=b, idx=idx):
            s = start[path[0]] + end[path[-1]]
            for t, (pos, y) in enumerate(zip(idx, path, strict=True)):
                s = s + emissions[b, pos, y] + (trans[path[t - 1], y] if t else 0.0)
            return s

        if not idx:
            results.append((0.0, torch.zeros(emissions.shape[1:], dtype=emissions.dtype), 0.0, [], score))
            continue
        paths = list(itertools.product(range(crf.num_tags), repeat=len(idx)))
        scores = torch.stack([score(p) for p in paths]).detach()
        log_z = scores.logsumexp(0)
        marg = torch.zeros(emissions.shape[1:], dtype=scores.dtype)
        for p, s in zip(paths, scores, strict=True):
            for pos, y in zip(idx, p, strict=True):
                marg[pos, y] += (s - log_z).exp()
        best = int(scores.argmax())
        results.append((float(log_z), marg, float(scores[best]), list(paths[best]), score))
    return results


@pytest.mark.parametrize("num_tags", [3, 5])
@pytest.mark.parametrize(
    "batch,length,seed", [(1, 1, 0), (4, 2, 1), (5, 7, 2), (2, 16, 5), (6, 33, 3), (3, 64, 6), (3, 100, 4)]
)
def test_matches_pytorch_crf_on_prefix_masks(num_tags, batch, length, seed, monkeypatch):
    ref, ours = make_pair(num_tags, seed)
    # random float64 scores have no ties: the max-marginal path must be right without the fallback
    monkeypatch.setattr(CRF, "_backtrack", lambda *args: pytest.fail("the backpointer fallback ran"))
    gen = torch.Generator().manual_seed(seed)
    emissions = torch.randn(batch, length, num_tags, generator=gen, dtype=torch.float64) * 3
    tags = torch.randint(0, num_tags, (batch, length), generator=gen)
    mask = prefix_mask(batch, length, gen)
    for reduction in ("none", "sum", "mean", "token_mean"):
        expected = ref(emissions, tags, mask, reduction=reduction)
        got = ours(emissions, tags, mask, reduction=reduction)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert ours.decode(emissions, mask) == ref.decode(emissions, mask)
    # the Viterbi score is the score of the returned path
    score, path = ours.viterbi(emissions, mask)
    torch.testing.assert_close(score, ours.gold_score(emissions, path, mask), atol=1e-9, rtol=0)
    assert (path[~mask] == 0).all()


@pytest.mark.parametrize("num_tags", [3, 5])
def test_gradients_match_pytorch_crf(num_tags):
    ref, ours = make_pair(num_tags, seed=7)
    gen = torch.Generator().manual_seed(7)
    emissions = torch.randn(6, 40, num_tags, generator=gen, dtype=torch.float64)
    tags = torch.randint(0, num_tags, (6, 40), generator=gen)
    mask = prefix_mask(6, 40, gen)
    grads = []
    for crf in (ref, ours):
        e = emissions.clone().requires_grad_(True)
        crf.zero_grad()
        crf(e, tags, mask, reduction="token_mean").backward()
        grads.append([e.grad] + [p.grad for p in crf.parameters()])
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


def test_block_masks_match_brute_force():
    _, crf = make_pair(3, seed=11)
    length = 7
    # blocks that start late, single tokens, the full row, and an empty row
    starts, lengths = [0, 3, 2, 6, 1, 0, 4], [7, 4, 1, 1, 5, 0, 3]
    mask = block_mask(starts, lengths, length)
    gen = torch.Generator().manual_seed(11)
    emissions = torch.randn(len(starts), length, 3, generator=gen, dtype=torch.float64) * 2
    tags = torch.randint(0, 3, (len(starts), length), generator=gen)
    expected = brute_force(crf, emissions, mask)
    log_z = crf.log_partition(emissions, mask)
    marginals = crf.marginals(emissions, mask)
    score, path = crf.viterbi(emissions, mask)
    decoded = crf.decode(emissions, mask)
    llh = crf(emissions, tags, mask, reduction="none")
    for b, (z, marg, best, best_path, scorer) in enumerate(expected):
        assert log_z[b].item() == pytest.approx(z, abs=1e-9)
        torch.testing.assert_close(marginals[b], marg, atol=1e-9, rtol=0)
        assert score[b].item() == pytest.approx(best, abs=1e-9)
        assert decoded[b] == best_path
        assert path[b][mask[b]].tolist() == best_path and (path[b][~mask[b]] == 0).all()
        gold = scorer(tags[b][mask[b]].tolist()).item() if best_path else 0.0
        assert llh[b].item() == pytest.approx(gold - z, abs=1e-9)


def test_empty_rows_are_defined_and_do_not_poison_gradients():
    _, crf = make_pair(3, seed=12)
    emissions = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = block_mask([0, 0, 2], [0, 5, 0], 5)
    tags = torch.zeros(3, 5, dtype=torch.long)
    llh = crf(emissions, tags, mask, reduction="none")
    assert llh[0].item() == 0.0 and llh[2].item() == 0.0
    llh.sum().backward()
    assert torch.isfinite(emissions.grad).all() and (emissions.grad[0] == 0).all()
    assert crf.log_partition(emissions, mask)[0].item() == 0.0
    assert (crf.marginals(emissions, mask)[0] == 0).all()
    score, path = crf.viterbi(emissions, mask)
    assert score[0].item() == 0.0 and (path[0] == 0).all()
    assert crf.decode(emissions, mask)[0] == []


def test_gradcheck_float64_with_block_masks():
    torch.manual_seed(13)
    crf = CRF(3).double()
    emissions = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    mask = block_mask([1, 0, 5], [4, 6, 1], 6)
    tags = torch.randint(0, 3, (3, 6))

    names = [name for name, _ in crf.named_parameters()]

    def llh(e, *params):
        return torch.func.functional_call(crf, dict(zip(names, params, strict=True)), (e, tags, mask, "none"))

    params = [p.detach().clone().requires_grad_(True) for p in crf.parameters()]
    assert torch.autograd.gradcheck(llh, (emissions, *params))
    log_z = lambda e: crf.log_partition(e, mask)  # noqa: E731
    assert torch.autograd.gradcheck(log_z, (emissions,))


def test_gaps_in_a_mask_skip_positions():
    _, crf = make_pair(3, seed=14)
    emissions = torch.randn(1, 6, 3, dtype=torch.float64)
    mask = torch.tensor([[False, True, False, True, True, False]])
    tags = torch.randint(0, 3, (1, 6))
    packed = emissions[:, mask[0]]
    assert crf.log_partition(emissions, mask).item() == pytest.approx(crf.log_partition(packed).item())
    assert crf(emissions, tags, mask).item() == pytest.approx(crf(packed, tags[:, mask[0]]).item())
    assert crf.decode(emissions, mask) == crf.decode(packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_emissions_compute_in_float32(dtype):
    torch.manual_seed(15)
    crf = CRF(3)
    emissions = (torch.randn(4, 50, 3) * 4).to(dtype)
    tags = torch.randint(0, 3, (4, 50))
    mask = block_mask([3, 0, 10, 20], [40, 50, 1, 30], 50)
    llh = crf(emissions, tags, mask, reduction="none")
    assert llh.dtype == torch.float32
    torch.testing.assert_close(
        llh, crf(emissions.float(), tags, mask, reduction="none"), atol=1e-4, rtol=1e-5
    )
    e = emissions.clone().requires_grad_(True)
    crf(e, tags, mask).backward()
    assert e.grad.dtype == dtype and torch.isfinite(e.grad.float()).all()
    assert crf.marginals(emissions, mask).dtype == torch.float32
    assert crf.decode(emissions, mask) == crf.decode(emissions.float(), mask)


@pytest.mark.parametrize("scale", [1e-30, 1e4, 1e8])
def test_extreme_emissions_stay_finite(scale):
    torch.manual_seed(16)
    crf = CRF(3)
    with torch.no_grad():
        crf.transitions[TAG_O, TAG_I] = float("-inf")  # a hard BIO constraint
    emissions = (torch.randn(3, 30, 3) * scale).requires_grad_(True)
    tags = torch.zeros(3, 30, dtype=torch.long)
    mask = block_mask([0, 5, 29], [30, 20, 1], 30)
    llh = crf(emissions, tags, mask, reduction="none")
    assert torch.isfinite(llh).all() and (llh <= 1e-3 * max(scale, 1.0)).all()
    llh.sum().backward()
    assert torch.isfinite(emissions.grad).all()
    marginals = crf.marginals(emissions, mask)
    assert torch.isfinite(marginals).all() and (marginals >= 0).all() and (marginals <= 1).all()
    if scale < 1:  # at large scales float32 rounding of alpha + beta - log Z is itself large
        torch.testing.assert_close(marginals.sum(-1), mask.float(), atol=1e-4, rtol=0)
    score, path = crf.viterbi(emissions, mask)
    assert torch.isfinite(score).all()
    # the constraint holds on the best path: never O -> I
    for row in crf.decode(emissions, mask):
        assert all(not (a == TAG_O and b == TAG_I) for a, b in itertools.pairwise(row))


def test_viterbi_ties_give_a_consistent_best_path():
    crf = CRF(3)
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    emissions = torch.zeros(2, 9, 3)
    mask = block_mask([0, 2], [9, 5], 9)
    score, path = crf.viterbi(emissions, mask)
    torch.testing.assert_close(score, crf.gold_score(emissions, path, mask))


# ----------------------------------------------------------------------------- QA helpers
def test_bio_tags_label_the_answer_inside_the_context():
    context = block_mask([5, 5, 3], [10, 10, 4], 16)
    tags = bio_tags(torch.tensor([7, 0, 6]), torch.tensor([9, 0, 6]), context)
    assert tags[0].tolist() == [0] * 7 + [TAG_B, TAG_I, TAG_I] + [0] * 6
    assert (tags[1] == TAG_O).all()
    assert tags[2].tolist() == [0] * 6 + [TAG_B] + [0] * 9
    # labels are trusted here (the window store checks them when it opens: tests/test_data_prepare.py)


def span_path(length: int, first: int, last: int, i: int | None, j: int | None) -> list[int]:
    path = [TAG_O] * (last - first + 1)
    if i is not None:
        path[i - first] = TAG_B
        for t in range(i + 1, j + 1):
            path[t - first] = TAG_I
    return path


def test_crf_candidates_match_brute_force():
    _, crf = make_pair(3, seed=17, scale=2.0)
    length = 9
    starts, lengths = [2, 0, 4, 8, 3], [6, 9, 3, 1, 0]
    mask = block_mask(starts, lengths, length)
    gen = torch.Generator().manual_seed(17)
    emissions = torch.randn(len(starts), length, 3, generator=gen, dtype=torch.float64) * 2
    max_len = 4
    cands = crf_candidates(crf, emissions, mask, n_best=50, max_answer_length=max_len)
    expected = brute_force(crf, emissions, mask)
    for b, (log_z, _, _, _, scorer) in enumerate(expected):
        first, n = starts[b], lengths[b]
        last = first + n - 1
        if n == 0:
            assert cands.null_scores[b] == 0.0 and (cands.scores[b] == float("-inf")).all()
            continue
        assert cands.null_scores[b] == pytest.approx(
            float(scorer(span_path(length, first, last, None, None))) - log_z, abs=1e-4
        )
        spans = {
            (i, j): float(scorer(span_path(length, first, last, i, j))) - log_z
            for i in range(first, last + 1)
            for j in range(i, min(last, i + max_len - 1) + 1)
        }
        finite = cands.scores[b] > float("-inf")
        got = dict(
            zip(
                zip(cands.starts[b][finite].tolist(), cands.ends[b][finite].tolist(), strict=True),
                cands.scores[b][finite].tolist(),
                strict=True,
            )
        )
        assert got.keys() == spans.keys()
        for key, value in spans.items():
            assert got[key] == pytest.approx(value, abs=1e-4)
        assert list(cands.scores[b][finite]) == sorted(cands.scores[b][finite], reverse=True)


def test_crf_candidates_keep_the_top_n_best():
    _, crf = make_pair(3, seed=18, scale=2.0)
    emissions = torch.randn(2, 40, 3, dtype=torch.float64)
    mask = block_mask([10, 0], [30, 40], 40)
    full = crf_candidates(crf, emissions, mask, n_best=1000, max_answer_length=5)
    top = crf_candidates(crf, emissions, mask, n_best=7, max_answer_length=5)
    assert top.scores.shape == (2, 7) and top.scores.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(top.scores), torch.from_numpy(full.scores[:, :7]))
    assert ((top.ends - top.starts) < 5).all() and (top.starts >= torch.tensor([[10], [0]]).numpy()).all()


def test_bad_shapes_are_refused_with_the_shapes_named():
    crf = CRF(3)
    with pytest.raises(ValueError, match=r"\[B, T, 3\], got \(2, 4, 5\)"):
        crf.viterbi(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"mask \(2, 3\) does not match emissions \(2, 4, 3\)"):
        crf.log_partition(torch.randn(2, 4, 3), torch.ones(2, 3, dtype=torch.bool))
    for call in (crf.viterbi, crf.log_partition, crf.marginals, crf.decode):
        with pytest.raises(ValueError, match="no positions"):
            call(torch.randn(2, 0, 3))


def test_span_helpers_reject_bad_input():
    crf = CRF(2)
    with pytest.raises(ValueError, match="num_tags=2"):  # BIO spans need tags 0, 1, 2
        crf_candidates(crf, torch.randn(1, 4, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="contiguous"):
        crf_candidates(CRF(3), torch.randn(1, 4, 3), torch.tensor([[True, False, True, True]]))


def test_viterbi_never_stitches_two_tied_best_paths():
    # the best paths are 1,2 and 2,1 (equal scores); the per-position best tags would stitch 1,1
    crf = CRF(3)
    with torch.no_grad():
        crf.transitions.fill_(float("-inf"))
        crf.transitions[1, 2] = crf.transitions[2, 1] = 0.0
        crf.start_transitions.copy_(torch.tensor([float("-inf"), 0.0, 0.0]))
        crf.end_transitions.copy_(torch.tensor([float("-inf"), 0.0, 0.0]))
    emissions = torch.zeros(1, 2, 3)
    score, path = crf.viterbi(emissions)
    assert score.item() == 0.0
    assert path[0].tolist() in ([1, 2], [2, 1])
    torch.testing.assert_close(crf.gold_score(emissions, path), score)


@pytest.mark.parametrize(
    "semiring",
    [
        ("max", crf_module._max_matmul, crf_module._max_vecmat, crf_module._max_matvec, torch.amax),
        ("log", crf_module._log_matmul, crf_module._log_vecmat, crf_module._log_matvec, torch.logsumexp),
    ],
    ids=lambda s: s[0],
)
def test_tree_sweeps_match_sequential_scans(semiring):
    # every tree shape: lengths that pad at some levels, powers of two, a single position
    _, matmul, vecmat, matvec, reduce = semiring
    k, batch = 3, 2
    for length in [*range(1, 34), 64]:
        m = torch.randn(
            k, k, length, batch, dtype=torch.float64, generator=torch.Generator().manual_seed(length)
        )
        levels, total = crf_module._up_sweep(m, matmul)
        row0 = crf_module._row_zero(k, batch, m.dtype, m.device)
        entering = crf_module._prefix_down_sweep(levels, row0, vecmat)
        leaving = crf_module._suffix_down_sweep(levels, torch.zeros(k, 1, batch, dtype=m.dtype), matvec)
        v, w = row0[:, 0], torch.zeros(k, batch, dtype=m.dtype)
        for t in range(length):  # the sequential reference, both ways
            torch.testing.assert_close(entering[:, t], v, msg=f"prefix, length {length}, t {t}")
            v = reduce(v.unsqueeze(1) + m[:, :, t], 0)
            s = length - 1 - t
            torch.testing.assert_close(leaving[:, s], w, msg=f"suffix, length {length}, t {s}")
            w = reduce(m[:, :, s] + w.unsqueeze(0), 1)
        torch.testing.assert_close(total[0, :, 0], v, msg=f"total, length {length}")


@pytest.mark.parametrize("trans_scale", [10.0, 20.0])
def test_scaled_and_log_space_scans_agree(trans_scale):
    # float32 transitions spanning ~20 stay on the scaled scan, ~40 take the log-space one; float64
    # (scaled either way) is the reference. Large emissions stress underflow in the scaled products.
    torch.manual_seed(20)
    crf = CRF(3).double()
    with torch.no_grad():
        crf.transitions.uniform_(-trans_scale, trans_scale)
        crf.transitions[0, 0], crf.transitions[1, 2] = trans_scale, -trans_scale  # the full range
        crf.start_transitions.uniform_(-5.0, 5.0)
        crf.end_transitions.uniform_(-5.0, 5.0)
    emissions = torch.randn(4, 60, 3, dtype=torch.float64) * 30
    mask = block_mask([0, 7, 59, 3], [60, 40, 1, 0], 60)
    tags = torch.randint(0, 3, (4, 60))
    results = []
    for dtype in (torch.float64, torch.float32):
        model = CRF(3).to(dtype)
        model.load_state_dict(crf.state_dict())
        e = emissions.to(dtype).clone().requires_grad_(True)
        llh = model(e, tags, mask, reduction="none")
        llh.sum().backward()
        results.append((llh.double(), e.grad.double(), model.transitions.grad.double()))
        results[-1] += (model.marginals(e.detach(), mask).double(),)
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-5)
    # float32 rounding of scores ~1e3 leaves ~1e-4 in each probability
    assert torch.allclose(results[1][3].sum(-1), mask.double(), atol=1e-3)
