"""spanqa's linear-chain CRF: pytorch-crf's function, without a Python loop over tokens.

The chain over the active (mask on) positions of each row is written as a product of per-position
[K, K] matrices in the log semiring (logsumexp, +) or the max-plus semiring (max, +):

    M_t[i, j] = trans[i, j] + emit_t[j]        (an active position with an active predecessor)
    M_t[i, j] = start[j] + emit_t[j]           (the first active position: every row the same)
    M_t[i, j] += end[j]                        (the last active position)
    M_t = log-identity                         (masked positions, and padding)

so log Z = logsumexp_j (M_1 ⋯ M_T)[0, j]. The product is an associative reduction: a balanced
tree (O(log T) sequential levels, O(T) work) gives log Z; walking the same tree back down with
vectors instead of matrices (a Blelloch down-sweep) gives every prefix vector (alpha) and suffix
vector (beta), hence the pairwise marginals, which are exactly the gradient of log Z with respect to
each M_t (a hand-written backward: much cheaper than differentiating the tree). The sum-product
tree runs on rescaled plain numbers (ordinary matrix products, one log per block; see "scaled
sum-product tree"), falling back to logsumexp in log space when hard constraints (-inf transitions)
or huge transitions could make that inexact.

Viterbi is the max-plus tree plus both down-sweeps: the best path takes, at each position, the tag
whose best path through it is best (max-marginals); the stitched path is checked against the
optimum, and on ties that break it, backpointer maps y_{t-1} = bp_t(y_t) are composed by a
doubling scan instead — the same tie-breaking as a sequential backtrack.

Masks may be any contiguous block per row (the context tokens after ``[CLS] question [SEP]``);
the model is defined over the active positions in order, so a row with no active position has
log Z = 0, log-likelihood 0, marginals 0, Viterbi score 0 and an empty path. Emissions of any
float dtype are computed in float32 (float64 stays float64), inside an fp16/bf16 autocast region too.

On CUDA tensors a fused Triton kernel (``spanqa.model.crf_triton``) is used when triton imports (and
outside ``torch_scan_only()``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# log 0 stand-in: finite, so that max/logsumexp never compute inf - inf; exp() of anything near it
# is exactly 0, and sums of a few of them stay far inside the float32 range.
NEG = -1e30
# emissions are clipped to this magnitude so that real scores never approach NEG
_EMISSION_LIMIT = 1e20

# exp() arguments of the log-space scan are clamped here: torch's vectorised exp is ~20x slower on
# arguments below about -88 (its out-of-range and denormal paths), and log 0 is everywhere in that
# scan. exp(-80) ~ 2e-35 is below the rounding of float32 and float64 next to the max term (1).
_EXP_FLOOR = -80.0
# and above here where rounding could push them up (a float32 exp overflows above ~88)
_EXP_CEILING = 80.0

# _INFERENCE: the scans run under torch.inference_mode(): they are hundreds of small ops, many of
# them views, and dropping autograd's view and version tracking saves ~15% of their CPU time. What
# leaves inference mode is cloned into ordinary tensors.

TAG_O, TAG_B, TAG_I = 0, 1, 2
REDUCTIONS = ("none", "sum", "mean", "token_mean")


# ----------------------------------------------------------------------------- semiring kernels
# Layout: tag indices first, positions last ("structure of arrays"): matrices are [K, K, L, B] and
# vectors [K, L, B], so that every elementwise op runs over long contiguous inner loops of positions
# (an inner dimension of size K = 3 would defeat vectorisation; and torch's bmm on 3x3 matrices is
# ~10x slower than these broadcast ops).
_UNROLL_MAX_K = 8


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """Ordinary product of [K, K, ...] matrices: K broadcast multiply-adds, no [K, K, K, ...] temporary."""
    out = a[:, :1] * b[:1]
    for j in range(1, a.shape[0]):
        out.addcmul_(a[:, j : j + 1], b[j : j + 1])
    return out


def _vecmat(v: Tensor, a: Tensor) -> Tensor:
    """[K, ...] x [K, K, ...] -> [K, ...]: sum_i v[i] a[i, j]."""
    out = v[:1] * a[0]
    for i in range(1, a.shape[0]):
        out.addcmul_(v[i : i + 1], a[i])
    return out


def _matvec(a: Tensor, w: Tensor) -> Tensor:
    """[K, K, ...] x [K, ...] -> [K, ...]: sum_j a[i, j] w[j]."""
    out = a[:, 0] * w[:1]
    for j in range(1, a.shape[0]):
        out.addcmul_(a[:, j], w[j : j + 1])
    return out


def _rescale(x: Tensor, log_scale: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Divide x (in place) by its peak over `dims` and move the peak into the log scale."""
    # an all-zero block only comes from an impossible chain; keep it zero instead of 0/0
    peak = x.amax(dims).clamp_(min=torch.finfo(x.dtype).tiny)
    x /= peak
    return x, log_scale + peak.log()


def _lse0(s: Tensor) -> Tensor:
    """logsumexp over dim 0 (s is consumed)."""
    m = s.amax(0)
    return s.sub_(m).clamp_(min=_EXP_FLOOR).exp_().sum(0).log_().add_(m)


def _log_matmul(a: Tensor, b: Tensor) -> Tensor:
    """[K, K, ...] x [K, K, ...] in the log semiring: c[i, k] = logsumexp_j a[i, j] + b[j, k]."""
    return _lse0(a.transpose(0, 1).unsqueeze(2) + b.unsqueeze(1))  # [j, i, k, ...]


def _log_vecmat(v: Tensor, a: Tensor) -> Tensor:
    return _lse0(v.unsqueeze(1) + a)


def _log_matvec(a: Tensor, w: Tensor) -> Tensor:
    return _lse0(a.transpose(0, 1) + w.unsqueeze(1))


def _max_matmul(a: Tensor, b: Tensor) -> Tensor:
    """[K, K, ...] x [K, K, ...] in the max-plus semiring: c[i, k] = max_j a[i, j] + b[j, k]."""
    return (a.unsqueeze(2) + b.unsqueeze(0)).amax(1)  # [i, j, k, ...]: no transposed view needed


def _max_vecmat(v: Tensor, a: Tensor) -> Tensor:
    return (v.unsqueeze(1) + a).amax(0)


def _max_matvec(a: Tensor, w: Tensor) -> Tensor:
    return (a + w.unsqueeze(0)).amax(1)


def _argmax_into(v: Tensor, trans: Tensor) -> Tensor:
    """argmax_i v[i, ...] + trans[i, j] -> [K(j), ...], the first index on ties (as a sequential
    backtrack takes it)."""
    k = trans.shape[0]
    extra = (1,) * (v.dim() - 1)
    if k > _UNROLL_MAX_K:
        return (v.unsqueeze(1) + trans.view(k, k, *extra)).argmax(dim=0)
    best = v[0].unsqueeze(0) + trans[0].view(k, *extra)
    index = torch.zeros(best.shape, dtype=torch.long, device=v.device)
    for i in range(1, k):
        term = v[i].unsqueeze(0) + trans[i].view(k, *extra)
        better = term > best
        best = torch.where(better, term, best)
        index.masked_fill_(better, i)
    return index


def _log_identity(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    eye = torch.full((k, k), NEG, dtype=dtype, device=device)
    return eye.fill_diagonal_(0.0)


def _row_zero(k: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The log one-hot vector e_0 [K, 1, B]: the chain reads row 0 of the product."""
    v = torch.full((k, 1, batch), NEG, dtype=dtype, device=device)
    v[0] = 0.0
    return v


# ----------------------------------------------------------------------------- log-space tree
# (Viterbi in the max-plus semiring; log Z when the scaled scan below cannot guarantee exactness)
def _up_sweep(m: Tensor, matmul) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Pairwise products level by level over dim 2 of [K, K, L, B]; returns each (even-padded)
    level as its (left, right) children [K, K, L/2, B] and the [K, K, 1, B] total."""
    k, _, _, batch = m.shape
    levels = []
    while m.shape[2] > 1:
        if m.shape[2] % 2:
            eye = _log_identity(k, m.dtype, m.device).view(k, k, 1, 1).expand(k, k, 1, batch)
            m = torch.cat([m, eye], dim=2)
        left, right = m[:, :, 0::2], m[:, :, 1::2]
        levels.append((left, right))
        m = matmul(left, right)
    return levels, m


# The down-sweeps write into one [K, span, B] array, span = 2^levels: a node of level h covers the
# positions [s 2^h, (s + 1) 2^h) (its padding past T included), and the vector entering it is the one
# entering its first position, the vector leaving it the one leaving its last. So a node's left child
# shares its entering vector and its right child its leaving one, and each level writes only the
# other child's vector, into a strided view: no interleaving copies, no growing arrays. (The results
# are computed contiguous and then copied: a reduction written straight into a strided view is
# several times slower on CPU.)
def _prefix_down_sweep(levels: list[tuple[Tensor, Tensor]], top_in: Tensor, vecmat) -> Tensor:
    """Vector entering each position, top_in ⊗ M_0 ⋯ M_{t-1}, as [K, span + 1, B] (span >= T; the
    last index is left for the caller: the vector past the end)."""
    k, _, batch = top_in.shape
    step = 2 ** len(levels)
    out = top_in.new_empty(k, step + 1, batch)
    out[:, :1] = top_in
    for left, _ in reversed(levels):
        end, half = left.shape[2] * step, step // 2
        out[:, half:end:step] = vecmat(out[:, 0:end:step], left)  # entering each right child
        step = half
    return out


def _suffix_down_sweep(levels: list[tuple[Tensor, Tensor]], top_out: Tensor, matvec) -> Tensor:
    """Vector leaving each position, M_{t+1} ⋯ M_{T-1} ⊗ top_out, as [K, span, B] (span >= T)."""
    k, _, batch = top_out.shape
    step = 2 ** len(levels)
    out = top_out.new_empty(k, step, batch)
    out[:, -1:] = top_out
    for _, right in reversed(levels):
        end, half = right.shape[2] * step, step // 2
        out[:, half - 1 : end : step] = matvec(right, out[:, step - 1 : end : step])  # leaving left
        step = half
    return out


# ----------------------------------------------------------------------------- scaled sum-product tree
# log Z and its gradient run on plain numbers instead of logs: each chain matrix (and each partial
# product, and each alpha/beta vector) is a pair (P, s) standing for exp(s) * P, with P's largest
# entry 1. A product is then an ordinary matrix product (multiply-adds, no exp/log per entry) and one
# rescale (a max, a divide and a single log per block), which costs a fraction of a logsumexp.
# It stays exact to rounding: the rows of any product of chain matrices differ only through the
# transitions of its first factor (the emissions scale columns), so after rescaling every row, and
# every beta vector, keeps entries of at least exp(-transition range); entries that do underflow are
# ones the log-space sum would drop next to its maximum anyway.
def _scaled_chain(emit: Tensor, table: Tensor, kind: Tensor) -> tuple[Tensor, Tensor]:
    """exp(table[kind] + emit[None]) as (P [K, K, T, B], log scale [T, B]); one exp per emission
    (kind: the one-hot position kinds [3, T, B])."""
    k = table.shape[1]
    table_peak = table.amax((1, 2))
    columns = (table - table_peak.view(-1, 1, 1)).exp().reshape(3, k * k).t().contiguous()
    p = (columns @ kind.view(3, -1)).view(k, k, *kind.shape[1:])  # [K*K, 3]: a column per kind
    emit_peak = emit.amax(0)
    p *= (emit - emit_peak).exp_().unsqueeze(0)
    return p, (table_peak @ kind.view(3, -1)).view(emit_peak.shape) + emit_peak


def _scaled_up_sweep(p: Tensor, s: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """Pairwise products level by level over dim 2; returns the (even-padded) levels and the
    [K, K, 1, B] total with its [1, B] log scale."""
    k, _, _, batch = p.shape
    eye = torch.eye(k, dtype=p.dtype, device=p.device).view(k, k, 1, 1).expand(k, k, 1, batch)
    levels = []
    while p.shape[2] > 1:
        if p.shape[2] % 2:
            p, s = torch.cat([p, eye], dim=2), torch.cat([s, s.new_zeros(1, batch)])
        levels.append((p, s))
        p, s = _rescale(_matmul(p[:, :, 0::2], p[:, :, 1::2]), s[0::2] + s[1::2], (0, 1))
    return levels, p, s


def _interleave(x: Tensor, y: Tensor, dim: int) -> Tensor:
    return torch.stack([x, y], dim=dim + 1).flatten(dim, dim + 1)


def _scaled_alpha(levels: list[tuple[Tensor, Tensor]], p0: Tensor) -> tuple[Tensor, Tensor]:
    """Vector entering each level-0 element, e_0 M_1 ⋯ M_{t-1}, as ([K, L_padded, B], [L_padded, B])."""
    v = torch.zeros(p0.shape[0], 1, p0.shape[3], dtype=p0.dtype, device=p0.device)
    v[0] = 1.0
    s = v.new_zeros(1, p0.shape[3])
    for p, ps in reversed(levels):
        half = p.shape[2] // 2
        v, s = v[:, :half], s[:half]
        right, right_s = _rescale(_vecmat(v, p[:, :, 0::2]), s + ps[0::2], (0,))
        v, s = _interleave(v, right, 1), _interleave(s, right_s, 0)
    return v, s


def _scaled_beta(levels: list[tuple[Tensor, Tensor]], p0: Tensor) -> tuple[Tensor, Tensor]:
    """Vector leaving each level-0 element, M_{t+1} ⋯ M_T 1, as ([K, L_padded, B], [L_padded, B])."""
    w = torch.ones(p0.shape[0], 1, p0.shape[3], dtype=p0.dtype, device=p0.device)
    s = w.new_zeros(1, p0.shape[3])
    for p, ps in reversed(levels):
        half = p.shape[2] // 2
        w, s = w[:, :half], s[:half]
        left, left_s = _rescale(_matvec(p[:, :, 1::2], w), s + ps[1::2], (0,))
        w, s = _interleave(left, w, 1), _interleave(left_s, s, 0)
    return w, s


def _scaled_log_z(top: Tensor, top_scale: Tensor) -> Tensor:
    """log Z [B] from the [K, K, 1, B] total: the sum of its row 0."""
    return top[0, :, 0].sum(0).log() + top_scale[0]


def _pairwise_marginals(p: Tensor, s: Tensor, levels: list, log_z: Tensor) -> Tensor:
    """p(y_prev = i, y_t = j) = alpha_i M_ij beta_j / Z as [K, K, T, B] (d log Z / d M_t)."""
    length = p.shape[2]
    alpha, alpha_s = _scaled_alpha(levels, p)
    beta, beta_s = _scaled_beta(levels, p)
    # the true exponent is small (the normalised parts multiply to at least exp(-2 x transition
    # range)), but rounding of huge log scales must not overflow exp into inf * 0
    log_factor = (alpha_s[:length] + s + beta_s[:length] - log_z).clamp_(max=_EXP_CEILING)
    g = alpha[:, :length].unsqueeze(1) * p
    g *= beta[:, :length].unsqueeze(0)
    g *= log_factor.exp_()
    return g.clamp_(max=1.0)  # a probability, also after rounding


# position kinds: which [K, K] block a position's chain matrix starts from. They travel as one-hot
# floats [3, T, B], so that picking the block is a few exact multiply-adds (or a tiny matrix
# product), much faster on CPU than indexing, and the gradient of the blocks is a matrix product.
_INNER, _FIRST, _MASKED = 0, 1, 2


def _kind_table(start: Tensor, trans: Tensor) -> Tensor:
    """[3, K, K]: transitions, start (every row the same), log-identity — indexed by position kind."""
    k = trans.shape[0]
    eye = _log_identity(k, trans.dtype, trans.device)
    return torch.stack([trans, start.expand(k, k), eye])


def _chain_from(emit: Tensor, table: Tensor, kind: Tensor) -> Tensor:
    """Log-space M [K, K, T, B] = table[kind] + emit[None] (emit [K, T, B] is 0 at masked positions)."""
    k = table.shape[1]
    # a multiply-add per kind (0 x log 0 is 0): cheaper than a matrix product with a 3-long inner dim
    m = torch.addcmul(emit.unsqueeze(0), table[0].view(k, k, 1, 1), kind[0])
    for block, flags in zip(table[1:], kind[1:], strict=True):
        m.addcmul_(block.view(k, k, 1, 1), flags)
    return m


def _log_pairwise_marginals(m: Tensor, levels: list[tuple[Tensor, Tensor]], log_z: Tensor) -> Tensor:
    """The log-space counterpart of `_pairwise_marginals` (m: log chain matrices)."""
    k, _, length, batch = m.shape
    zeros = torch.zeros(k, 1, batch, dtype=m.dtype, device=m.device)
    alpha = _prefix_down_sweep(levels, _row_zero(k, batch, m.dtype, m.device), _log_vecmat)[:, :length]
    beta = _suffix_down_sweep(levels, zeros, _log_matvec)[:, :length]
    g = alpha.unsqueeze(1) + m
    g += beta.unsqueeze(0)
    g -= log_z
    # a probability: rounding at huge scores must not push it above 1 (or overflow exp)
    return g.clamp_(min=_EXP_FLOOR, max=0.0).exp_()


def _scaled_scan_is_exact(trans: Tensor) -> bool:
    """Whether the scaled scan's underflow stays below rounding: rows of a normalised product keep
    entries of at least exp(-r), r the range of the transitions, and what underflows is below
    tiny * exp(2 r) of the result; r up to 0.4 log(eps / tiny) (28 in float32, 268 in float64) keeps
    that under eps. Hard constraints (-inf transitions) or huge ones take the log-space scan."""
    info = torch.finfo(trans.dtype)
    return bool(trans.max() - trans.min() <= 0.4 * math.log(info.eps / info.tiny))


def _sum_product(emit: Tensor, table: Tensor, kind: Tensor) -> tuple[Tensor, bool, list[Tensor]]:
    """log Z [B], whether the scaled scan ran, and the tensors the pairwise marginals start from."""
    if _scaled_scan_is_exact(table[_INNER]):
        p, s = _scaled_chain(emit, table, kind)
        levels, top, top_scale = _scaled_up_sweep(p, s)
        return _scaled_log_z(top, top_scale), True, [p, s, *(x for level in levels for x in level)]
    m = _chain_from(emit, table, kind)
    levels, total = _up_sweep(m, _log_matmul)
    return total[0, :, 0].logsumexp(0), False, [m, *levels]


def _marginals_from(saved: list[Tensor], scaled: bool, log_z: Tensor) -> Tensor:
    """Pairwise marginals [K, K, T, B] from what `_sum_product` returned."""
    if scaled:
        p, s, *flat = saved
        return _pairwise_marginals(p, s, list(zip(flat[0::2], flat[1::2], strict=True)), log_z)
    m, *levels = saved
    return _log_pairwise_marginals(m, levels, log_z)


def _chain_inputs(
    emissions: Tensor, start: Tensor, end: Tensor, trans: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(emit [K, T, B], kind table [3, K, K], one-hot kinds [3, T, B]) from which the chain matrices
    are built (see `_chain_from`), and the last-position flags [T, B]; emit is the emissions, + end at
    the last active position, 0 where masked."""
    k = trans.shape[0]
    # [T, B] and [K, T, B], made contiguous once: an op whose inputs are transposed views runs with
    # strided inner loops (and hands that layout on to its result), several times slower on CPU
    dense = torch.contiguous_format
    active = active.t().to(emissions.dtype, memory_format=dense)
    first, last = _first_and_last(active)
    emit = emissions.permute(2, 1, 0).clone(memory_format=dense)  # a copy: it is written in place
    emit.addcmul_(end.view(k, 1, 1), last).mul_(active)
    kind = torch.stack([active - first, first, 1.0 - active])
    return emit, _kind_table(start, trans), kind, last


def _first_and_last(active: Tensor) -> tuple[Tensor, Tensor]:
    """0/1 flags [T, B] of the first and the last active position, from 0/1 floats `active` [T, B]."""
    # arithmetic with 0/1 floats rather than comparisons and bool products: about twice as fast on
    # CPU. With c the running count of active positions, the first has c = 1 and the last c = n.
    count = active.cumsum(0)
    first = (2.0 - count).clamp_(min=0.0).mul_(active)
    last = (count - count[-1:]).add_(1.0).clamp_(min=0.0).mul_(active)
    return first, last


class _LogPartition(torch.autograd.Function):
    """log Z [B] with the forward-backward marginals as the hand-written gradient, from the prepared
    emissions [B, T, K], start, end, transitions and the active flags [B, T].

    Building the chain inside the function keeps those few dozen small ops off the autograd graph:
    their gradient is a handful of sums of the marginals."""

    # Both passes run in inference mode (see `_INFERENCE`); the scan's intermediates, made there,
    # are kept on ctx (inference tensors cannot go through save_for_backward) and never modified.
    @staticmethod
    def forward(ctx, emissions, start, end, trans, active) -> Tensor:
        with torch.inference_mode():
            emit, table, ctx.kind, ctx.last = _chain_inputs(emissions, start, end, trans, active)
            ctx.log_z, ctx.scaled, ctx.scan = _sum_product(emit, table, ctx.kind)
        return ctx.log_z.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_z: Tensor):
        kind = ctx.kind
        with torch.inference_mode():
            g = _marginals_from(ctx.scan, ctx.scaled, ctx.log_z)
            k = g.shape[0]
            g *= grad_log_z.to(g.dtype)
            # masked positions carry the state through an identity: they are not part of the model
            grad_emit = _sum_rows(g).mul_(1.0 - kind[_MASKED])  # [K, T, B]
            grad_table = (g.view(k * k, -1) @ kind.view(3, -1).t()).view(k, k, 3)
            grad_end = (grad_emit * ctx.last).sum((1, 2))  # end is added at the last position
            grad_start = grad_table[:, :, _FIRST].sum(0)  # start fills every row of its block
            grads = (grad_emit.permute(2, 1, 0), grad_start, grad_end, grad_table[:, :, _INNER])
        return *(x.clone(memory_format=torch.contiguous_format) for x in grads), None


def _sum_rows(g: Tensor) -> Tensor:
    """sum_i g[i, j, ...] ([K, K, ...] -> [K, ...])."""
    out = g[0].clone()
    for i in range(1, g.shape[0]):
        out += g[i]
    return out


# ----------------------------------------------------------------------------- the module
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# Whether CUDA tensors take the fused Triton kernels; `torch_scan_only()` turns it off for a while.
_FUSED_ON_CUDA = True


@contextlib.contextmanager
def torch_scan_only() -> Iterator[None]:
    """Inside it, CUDA tensors take the torch scan instead of the fused Triton kernels: the tests and
    benchmarks that compare the two on one GPU use it."""
    global _FUSED_ON_CUDA
    before, _FUSED_ON_CUDA = _FUSED_ON_CUDA, False
    try:
        yield
    finally:
        _FUSED_ON_CUDA = before


def _use_triton(emissions: Tensor) -> bool:
    if not emissions.is_cuda or not _FUSED_ON_CUDA:
        return False
    from spanqa.model import crf_triton

    return crf_triton.available()


def _fp32_inside(method):
    """Autocast off while `method` runs: inside an fp16/bf16 autocast region the scans' matrix
    products would run in half precision; the CRF computes in float32 (float64 stays float64)."""

    @functools.wraps(method)
    def run(self, emissions: Tensor, *args, **kwargs):
        with torch.autocast(device_type=emissions.device.type, enabled=False):
            return method(self, emissions, *args, **kwargs)

    return run


class CRF(nn.Module):
    """Linear-chain CRF with pytorch-crf's parameters and semantics (``batch_first=True``).

    Emissions are [B, T, num_tags]; masks [B, T] (bool or 0/1) select a contiguous block of each row
    (any start, not only a prefix); ``mask=None`` means every position.

    Hard constraints (AllenNLP's ``constraints``, applied in training as well as in decoding, as in the
    Masked CRF of Wei et al. 2021): ``allowed_start`` [K], ``allowed_transitions`` [K, K] (from, to) and
    ``allowed_end`` [K] (bool; None allows all) give a path through a forbidden entry probability 0 —
    exactly pytorch-crf with those entries at -inf. They are kept as fixed -inf masks beside the
    parameters, so that no optimizer step or weight decay ever touches a forbidden entry.
    """

    def __init__(
        self,
        num_tags: int,
        allowed_start: Tensor | None = None,
        allowed_transitions: Tensor | None = None,
        allowed_end: Tensor | None = None,
    ) -> None:
        if num_tags <= 0:
            raise ValueError(f"invalid number of tags: {num_tags}")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = True
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        # not persistent: the constraints belong to the tag scheme that builds the CRF, not to its weights
        for name, allowed, shape in (
            ("start_mask", allowed_start, (num_tags,)),
            ("transition_mask", allowed_transitions, (num_tags, num_tags)),
            ("end_mask", allowed_end, (num_tags,)),
        ):
            self.register_buffer(name, _forbidding_mask(allowed, shape, name), persistent=False)
        self.reset_parameters()

    @property
    def constrained(self) -> bool:
        return any(m is not None for m in (self.start_mask, self.transition_mask, self.end_mask))

    def reset_parameters(self) -> None:
        # pytorch-crf's initialisation
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}"

    # ------------------------------------------------------------------ inputs
    def _prepare(self, emissions: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Emissions in the compute dtype, clipped, and the active flags [B, T] (bool)."""
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags:
            raise ValueError(f"emissions must be [B, T, {self.num_tags}], got {tuple(emissions.shape)}")
        if emissions.size(1) == 0:
            raise ValueError(f"emissions {tuple(emissions.shape)} have no positions (T = 0)")
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match emissions {tuple(emissions.shape)}")
        dtype = _compute_dtype(emissions, self.transitions)
        emissions = emissions.to(dtype).clamp(-_EMISSION_LIMIT, _EMISSION_LIMIT)
        return emissions, mask.bool()

    def _params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        # -inf transitions (hard constraints) become NEG so that the scan never sees inf - inf; a
        # forbidden entry's parameter gets no gradient (the clamp's)
        return tuple(
            (param if mask is None else param + mask).to(dtype).clamp(min=NEG)
            for param, mask in (
                (self.start_transitions, self.start_mask),
                (self.end_transitions, self.end_mask),
                (self.transitions, self.transition_mask),
            )
        )

    def _chain_inputs(self, emissions: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _chain_inputs(emissions, *self._params(emissions.dtype), active)

    def _chain_matrices(self, emissions: Tensor, active: Tensor) -> Tensor:
        emit, table, kind, _ = self._chain_inputs(emissions, active)
        return _chain_from(emit, table, kind)

    # ------------------------------------------------------------------ public API
    @_fp32_inside
    def log_partition(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """log Z [B] (0 for a row with no active position)."""
        emissions, active = self._prepare(emissions, mask)
        if _use_triton(emissions):
            from spanqa.model import crf_triton

            return crf_triton.log_partition(emissions, active, *self._params(emissions.dtype))
        return _LogPartition.apply(emissions, *self._params(emissions.dtype), active)

    @_fp32_inside
    def gold_score(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unnormalised score [B] of the given tag sequences over the active positions."""
        emissions, active = self._prepare(emissions, mask)
        return self._gold_score(emissions, tags, active, self._params(emissions.dtype))

    def _gold_score(self, emissions, tags, active, params: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        batch, length, k = emissions.shape
        start, end, trans = params
        tags = torch.where(active, tags.long(), 0)
        # the tag at the previous active position (gaps in a mask are skipped); none before the first
        positions = torch.arange(length, device=tags.device).expand(batch, length)
        latest = torch.where(active, positions, -1).cummax(dim=1).values
        previous = torch.cat([latest.new_full((batch, 1), -1), latest[:, :-1]], dim=1)
        last = active & (positions == latest[:, -1:])
        tags_before = tags.gather(1, previous.clamp(min=0))
        # count the transitions, start and end tags the path takes: the score is counts · weights,
        # whose gradient is a matrix product (indexing the weights would backpropagate through a
        # slow accumulating index_put)
        slot = torch.where(previous >= 0, tags_before * k + tags, k * k + tags)
        counts = emissions.new_zeros(batch, k * k + 2 * k).scatter_add_(1, slot, active.to(emissions.dtype))
        counts.scatter_add_(1, k * k + k + tags, last.to(emissions.dtype))
        weights = torch.cat([trans.flatten(), start, end])
        emit = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)
        return torch.where(active, emit, 0.0).sum(1) + counts @ weights

    @_fp32_inside
    def forward(
        self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None, reduction: str = "sum"
    ) -> Tensor:
        """Log-likelihood of ``tags`` [B, T]; reduction none [B] | sum | mean (over rows) | token_mean."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"invalid reduction: {reduction}")
        if tags.shape != emissions.shape[:2]:
            raise ValueError(f"tags {tuple(tags.shape)} do not match emissions {tuple(emissions.shape)}")
        emissions, active = self._prepare(emissions, mask)
        params = self._params(emissions.dtype)  # once: each clamp is an autograd node
        if _use_triton(emissions):
            from spanqa.model import crf_triton

            log_z = crf_triton.log_partition(emissions, active, *params)
        else:
            log_z = _LogPartition.apply(emissions, *params, active)
        llh = self._gold_score(emissions, tags, active, params) - log_z
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        return llh.sum() / active.sum().to(llh.dtype)

    @torch.no_grad()
    @_fp32_inside
    def marginals(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """p(y_t = j) [B, T, num_tags]; 0 at masked positions."""
        emissions, active = self._prepare(emissions, mask)
        if _use_triton(emissions):
            from spanqa.model import crf_triton

            return crf_triton.marginals(emissions, active, *self._params(emissions.dtype))
        with torch.inference_mode():  # see `_INFERENCE`
            emit, table, kind, _ = self._chain_inputs(emissions, active)
            log_z, scaled, saved = _sum_product(emit, table, kind)
            marginals = _sum_rows(_marginals_from(saved, scaled, log_z)).permute(2, 1, 0)
        return marginals.masked_fill(~active.unsqueeze(-1), 0.0)

    @torch.no_grad()
    @_fp32_inside
    def viterbi(self, emissions: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Best path score [B] and tags [B, T] (0 at masked positions; score 0 for an empty row)."""
        emissions, active = self._prepare(emissions, mask)
        if _use_triton(emissions):
            from spanqa.model import crf_triton

            return crf_triton.viterbi(emissions, active, *self._params(emissions.dtype))
        with torch.inference_mode():  # see `_INFERENCE`
            score, tags = self._viterbi_torch(emissions, active)
        return score.clone(), tags.clone()

    def _viterbi_torch(self, emissions: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """Max-marginals: with the max-plus prefix (through t) and suffix (after t) of every tag, the
        best path takes, at each position, the tag whose best path through it is best. On exact or
        rounding-level ties that can stitch two best paths into a worse one, so the stitched path is
        checked against the optimum, and on failure the backpointer scan (exact, consistent) runs."""
        batch, length, k = emissions.shape
        m = self._chain_matrices(emissions, active)
        levels, total = _up_sweep(m, _max_matmul)
        final = total[0, :, 0]  # [K, B]: best score of a full path ending in each tag
        score = final.amax(0)
        row0 = _row_zero(k, batch, m.dtype, m.device)
        entering = _prefix_down_sweep(levels, row0, _max_vecmat)  # best score before t, [K, span+1, B]
        entering[:, length] = final  # "before" the position past the end
        zeros = torch.zeros(k, 1, batch, dtype=m.dtype, device=m.device)
        leaving = _suffix_down_sweep(levels, zeros, _max_matvec)[:, :length]  # best after t
        through = entering[:, 1 : length + 1] + leaving  # best score of a path through each tag
        # [T, B]; masked positions get the tag the identity carries through them (when no tie)
        tags = _argmax0(through)
        tolerance = (1.0 + score.abs()) * (1e-5 if emissions.dtype != torch.float64 else 1e-12)
        if _path_score(m, tags).ge_(score - tolerance).all():
            return score, torch.where(active, tags.t(), 0)
        return score, self._backtrack(emissions, active, entering[:, :length], final)

    def _backtrack(self, emissions: Tensor, active: Tensor, entering: Tensor, final: Tensor) -> Tensor:
        """Exact backpointer path: y_{t-1} = bp_t(y_t), composed by a doubling scan over index maps."""
        batch, length, k = emissions.shape
        _, _, trans = self._params(emissions.dtype)
        pointers = _argmax_into(entering, trans)  # [K, T, B]: y_{t-1} = pointers[y_t, t]
        identity = torch.arange(k, device=emissions.device).view(k, 1, 1).expand(k, length, batch)
        after_first = active & (active.cumsum(1) > 1)  # active positions with an active predecessor
        pointers = torch.where(after_first.t(), pointers, identity)
        tags = _follow_pointers(pointers, _argmax0(final)).t()
        return torch.where(active, tags, 0)

    def decode(self, emissions: Tensor, mask: Tensor | None = None) -> list[list[int]]:
        """pytorch-crf's list form: the best tags over each row's active positions."""
        _, tags = self.viterbi(emissions, mask)
        tags = tags.cpu().numpy()  # numpy's indexing and tolist are faster than torch's
        if mask is None:
            return tags.tolist()
        active = mask.bool().cpu().numpy()
        flat = tags[active].tolist()
        paths, offset = [], 0
        for n in active.sum(1).tolist():
            paths.append(flat[offset : offset + n])
            offset += n
        return paths


def _forbidding_mask(allowed: Tensor | None, shape: tuple[int, ...], name: str) -> Tensor | None:
    """0 where allowed, -inf where forbidden (None: no constraint)."""
    if allowed is None:
        return None
    allowed = torch.as_tensor(allowed, dtype=torch.bool)
    if tuple(allowed.shape) != shape:
        raise ValueError(f"{name}: allowed entries must be {list(shape)}, got {list(allowed.shape)}")
    return torch.zeros(shape).masked_fill_(~allowed, float("-inf"))


def _argmax0(x: Tensor) -> Tensor:
    """argmax over dim 0, the first index on ties: with b_i = 1 where x[i] is below the maximum and
    0 at it, the index is b_0 + b_0 b_1 + b_0 b_1 b_2 + ..., summed from the inside out. Float ops
    only: torch's argmax over a small leading dim, cumprod and masked_fill are many times slower
    on CPU."""
    below = (x.amax(0) - x[:-1]).sign_()  # [K-1, ...]
    index = below[-1]
    for i in range(below.shape[0] - 2, -1, -1):
        index = (index + 1.0).mul_(below[i])
    return index.long()


def _path_score(m: Tensor, tags: Tensor) -> Tensor:
    """Score [B] of the path `tags` [T, B] through the chain matrices [K, K, T, B] (from tag 0 before
    the first position; a masked position that breaks the carry reads log 0)."""
    k, _, length, batch = m.shape
    previous = torch.cat([tags.new_zeros(1, batch), tags[:-1]])
    steps = m.view(k * k, length, batch).gather(0, torch.add(tags, previous, alpha=k).unsqueeze(0))
    return steps.sum((0, 1))


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """(outer ∘ inner)[y] = outer[inner[y]] for index maps [K, ...] over the first dimension."""
    k = outer.shape[0]
    if k > _UNROLL_MAX_K:
        return outer.gather(0, inner)
    # a select per possible value: far cheaper than gather over a strided first dimension
    out = outer[k - 1].expand_as(inner).clone()
    for value in range(k - 1):
        out = torch.where(inner == value, outer[value], out)
    return out


def _follow_pointers(pointers: Tensor, best_last: Tensor) -> Tensor:
    """Tags [T, B]: y_t = (bp_{t+1} ∘ ⋯ ∘ bp_T)(best_last), by doubling over index maps [K, T, B]."""
    k, length, batch = pointers.shape
    identity = torch.arange(k, device=pointers.device).view(k, 1, 1).expand(k, 1, batch)
    suffix = torch.cat([pointers[:, 1:], identity], dim=1)  # bp_{t+1}
    step = 1
    while step < length:
        # suffix[t] covers bp_{t+1..t+step}; compose with suffix[t+step] to cover twice as far
        head = _compose(suffix[:, : length - step], suffix[:, step:])
        suffix = torch.cat([head, suffix[:, length - step :]], dim=1)
        step *= 2
    index = best_last.view(1, 1, batch).expand(1, length, batch)
    return suffix.gather(0, index).squeeze(0)
