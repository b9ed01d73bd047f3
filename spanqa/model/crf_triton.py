"""Fused Triton kernels for the CRF: one program per sequence, the loop over time inside the kernel.

On a GPU the tree scan of `spanqa.model.crf` costs dozens of small kernel launches per level; here
forward (log Z and the alphas), backward (marginals and transition counts) and Viterbi (max-product,
backpointers and the backtrack) are one launch each. K (the number of tags) is padded to a power of
two with log-0 entries. Used automatically for CUDA tensors when triton imports; the tests run these
kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported: triton reads it when ``@triton.jit`` runs).

Conventions match `spanqa.model.crf`: emissions [B, T, K] already in the compute dtype, ``active``
[B, T] bool (the model runs over the active positions in order), parameters already clamped to be
finite; an empty row has log Z = 0, marginals 0, Viterbi score 0 and tags 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch scan is the fallback
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _chain_parameters(start_ptr, end_ptr, trans_ptr, K, BK: tl.constexpr):
        """Transitions [BK, BK] and start/end scores [BK], the padding tags at log 0 (-1e30)."""
        i = tl.arange(0, BK)
        j = tl.arange(0, BK)
        ok_i = i < K
        ok_j = j < K
        trans = tl.load(
            trans_ptr + i[:, None] * K + j[None, :], mask=ok_i[:, None] & ok_j[None, :], other=-1e30
        )
        start = tl.load(start_ptr + j, mask=ok_j, other=-1e30)
        end = tl.load(end_ptr + j, mask=ok_j, other=-1e30)
        return trans, start, end

    @triton.jit
    def _forward_kernel(
        em_ptr, act_ptr, first_ptr, start_ptr, end_ptr, trans_ptr, alpha_ptr, logz_ptr, T, K,
        BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        j = tl.arange(0, BK)
        ok_j = j < K
        trans, start, end = _chain_parameters(start_ptr, end_ptr, trans_ptr, K, BK)
        first = tl.load(first_ptr + b)
        alpha = start * 0.0 - 1e30
        for t in range(0, T):
            on = tl.load(act_ptr + b * T + t) != 0
            e = tl.load(em_ptr + (b * T + t) * K + j, mask=ok_j, other=-1e30)
            s = alpha[:, None] + trans  # [i, j]
            mx = tl.max(s, axis=0)
            inner = mx + tl.log(tl.sum(tl.exp(s - mx[None, :]), axis=0)) + e
            nxt = tl.where(t == first, start + e, inner)
            alpha = tl.where(on, nxt, alpha)
            # carried through masked positions: the alpha of the latest active position
            tl.store(alpha_ptr + (b * T + t) * BK + j, alpha)
        final = alpha + end
        mz = tl.max(final, axis=0)
        log_z = mz + tl.log(tl.sum(tl.exp(final - mz), axis=0))
        tl.store(logz_ptr + b, tl.where(first < T, log_z, 0.0))

    @triton.jit
    def _backward_kernel(
        em_ptr, act_ptr, first_ptr, end_ptr, trans_ptr, alpha_ptr, logz_ptr,
        marg_ptr, pair_ptr, T, K, BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        i = tl.arange(0, BK)
        j = tl.arange(0, BK)
        ok_i = i < K
        ok_j = j < K
        ok_ij = ok_i[:, None] & ok_j[None, :]
        trans = tl.load(trans_ptr + i[:, None] * K + j[None, :], mask=ok_ij, other=-1e30)
        end = tl.load(end_ptr + j, mask=ok_j, other=-1e30)
        first = tl.load(first_ptr + b)
        log_z = tl.load(logz_ptr + b)
        beta = end  # continuation from each tag at the latest active position seen so far
        pair = trans * 0.0
        for step in range(0, T):
            t = T - 1 - step
            on = tl.load(act_ptr + b * T + t) != 0
            alpha_t = tl.load(alpha_ptr + (b * T + t) * BK + j)
            marg = tl.where(on, tl.exp(tl.minimum(alpha_t + beta - log_z, 0.0)), 0.0)
            tl.store(marg_ptr + (b * T + t) * K + j, marg, mask=ok_j)
            inner = on & (t != first)
            e = tl.load(em_ptr + (b * T + t) * K + j, mask=ok_j, other=-1e30)
            # alpha of the previous active position (carried); (t - 1) mod T keeps t = 0 in bounds
            prev = tl.load(alpha_ptr + (b * T + (t + T - 1) % T) * BK + i)
            into = trans + (e + beta)[None, :]  # [i, j]: from tag i before t to tag j at t
            p = tl.exp(tl.minimum(prev[:, None] + into - log_z, 0.0))
            pair += tl.where(inner & ok_ij, p, 0.0)
            mx = tl.max(into, axis=1)
            back = mx + tl.log(tl.sum(tl.exp(into - mx[:, None]), axis=1))
            # from here on beta is indexed by the tag of the previous active position
            beta = tl.where(inner, back, beta)
        tl.store(pair_ptr + b * K * K + i[:, None] * K + j[None, :], pair, mask=ok_ij)

    @triton.jit
    def _viterbi_kernel(
        em_ptr, act_ptr, first_ptr, start_ptr, end_ptr, trans_ptr, bp_ptr, score_ptr, tags_ptr, T, K,
        BK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        j = tl.arange(0, BK)
        ok_j = j < K
        trans, start, end = _chain_parameters(start_ptr, end_ptr, trans_ptr, K, BK)
        first = tl.load(first_ptr + b)
        delta = start * 0.0 - 1e30
        for t in range(0, T):
            on = tl.load(act_ptr + b * T + t) != 0
            e = tl.load(em_ptr + (b * T + t) * K + j, mask=ok_j, other=-1e30)
            s = delta[:, None] + trans
            best = tl.max(s, axis=0)
            arg = tl.argmax(s, axis=0, tie_break_left=True)
            nxt = tl.where(t == first, start + e, best + e)
            delta = tl.where(on, nxt, delta)
            tl.store(bp_ptr + (b * T + t) * BK + j, arg.to(tl.int32))
        final = delta + end
        score = tl.max(final, axis=0)
        y = tl.argmax(final, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(score_ptr + b, tl.where(first < T, score, 0.0))
        tl.debug_barrier()  # the backpointers written above are read back below
        for step in range(0, T):
            t = T - 1 - step
            on = tl.load(act_ptr + b * T + t) != 0
            tl.store(tags_ptr + b * T + t, tl.where(on, y, 0).to(tl.int64))
            back = tl.load(bp_ptr + (b * T + t) * BK + y)
            y = tl.where(on & (t != first), back, y)


def _block_k(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def _bounds(active: Tensor) -> tuple[Tensor, Tensor]:
    """First and last active index per row (T and -1 for an empty row), int32."""
    length = active.shape[1]
    positions = torch.arange(length, device=active.device)
    first = torch.where(active, positions, length).amin(1).to(torch.int32)
    last = torch.where(active, positions, -1).amax(1).to(torch.int32)
    return first.contiguous(), last.contiguous()


def _forward(emissions, active, first, start, end, trans):
    batch, length, k = emissions.shape
    bk = _block_k(k)
    alpha = torch.empty(batch, length, bk, dtype=emissions.dtype, device=emissions.device)
    log_z = torch.empty(batch, dtype=emissions.dtype, device=emissions.device)
    _forward_kernel[(batch,)](emissions, active, first, start, end, trans, alpha, log_z, length, k, BK=bk)
    return alpha, log_z


def _backward(emissions, active, first, end, trans, alpha, log_z):
    batch, length, k = emissions.shape
    marg = torch.empty_like(emissions)
    pair = torch.empty(batch, k, k, dtype=emissions.dtype, device=emissions.device)
    _backward_kernel[(batch,)](
        emissions, active, first, end, trans, alpha, log_z, marg, pair, length, k, BK=_block_k(k)
    )
    return marg, pair


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().contiguous() for t in tensors]


class _FusedLogPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emissions, start, end, trans, active):
        active_u8 = active.to(torch.uint8).contiguous()
        first, last = _bounds(active)
        em, st, en, tr = _contiguous(emissions, start, end, trans)
        alpha, log_z = _forward(em, active_u8, first, st, en, tr)
        ctx.save_for_backward(em, active_u8, first, last, en, tr, alpha, log_z)
        return log_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_z):
        em, active_u8, first, last, en, tr, alpha, log_z = ctx.saved_tensors
        marg, pair = _backward(em, active_u8, first, en, tr, alpha, log_z)
        g = grad_log_z.to(marg.dtype)
        grad_emissions = marg * g.view(-1, 1, 1)
        rows = torch.arange(em.shape[0], device=em.device)
        nonempty = (first < em.shape[1]).to(marg.dtype).view(-1, 1) * g.view(-1, 1)
        grad_start = (marg[rows, first.long().clamp(max=em.shape[1] - 1)] * nonempty).sum(0)
        grad_end = (marg[rows, last.long().clamp(min=0)] * nonempty).sum(0)
        grad_trans = (pair * g.view(-1, 1, 1)).sum(0)
        return grad_emissions, grad_start, grad_end, grad_trans, None


def log_partition(emissions: Tensor, active: Tensor, start: Tensor, end: Tensor, trans: Tensor) -> Tensor:
    """log Z [B], differentiable in emissions and parameters."""
    return _FusedLogPartition.apply(emissions, start, end, trans, active)


def marginals(emissions: Tensor, active: Tensor, start: Tensor, end: Tensor, trans: Tensor) -> Tensor:
    active_u8 = active.to(torch.uint8).contiguous()
    first, _ = _bounds(active)
    em, st, en, tr = _contiguous(emissions, start, end, trans)
    alpha, log_z = _forward(em, active_u8, first, st, en, tr)
    marg, _ = _backward(em, active_u8, first, en, tr, alpha, log_z)
    return marg


def viterbi(
    emissions: Tensor, active: Tensor, start: Tensor, end: Tensor, trans: Tensor
) -> tuple[Tensor, Tensor]:
    batch, length, k = emissions.shape
    bk = _block_k(k)
    active_u8 = active.to(torch.uint8).contiguous()
    first, _ = _bounds(active)
    em, st, en, tr = _contiguous(emissions, start, end, trans)
    backpointers = torch.empty(batch, length, bk, dtype=torch.int32, device=em.device)
    score = torch.empty(batch, dtype=em.dtype, device=em.device)
    tags = torch.empty(batch, length, dtype=torch.long, device=em.device)
    _viterbi_kernel[(batch,)](em, active_u8, first, st, en, tr, backpointers, score, tags, length, k, BK=bk)
    return score, tags
