"""The CRF head's answer candidates: the exact log-probability of every one-span tagging of a window.

Under the CRF, a window's answer is a path O* B I* O* over its context tokens (or all O, no answer).
Every such path differs from the all-O path in a few transitions and emissions, so the score of all
spans at once is the all-O score plus differences read off cumulative sums: no decoding per span.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spanqa.eval.candidates import WindowCandidates
from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O


def _context_bounds(context_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First and last context index and context length per row; rows must be one contiguous block."""
    context = context_mask.bool()
    length = context.sum(1)
    positions = torch.arange(context.shape[1], device=context.device)
    first = torch.where(context, positions, context.shape[1]).amin(1)
    last = torch.where(context, positions, -1).amax(1)
    gapped = (length > 0) & (last - first + 1 != length)
    if bool(gapped.any()):  # evaluation only: its candidates go to the host anyway
        raise ValueError(
            f"context_mask: row {int(gapped.nonzero()[0, 0])}: context is not one contiguous block"
        )
    return first, last, length


def span_log_probs(
    crf: CRF, emissions: Tensor, context_mask: Tensor, max_answer_length: int
) -> tuple[Tensor, Tensor]:
    """log p(O* B I* O* with the span at i..i+a) as [B, T, A] (-inf where not a span inside the
    context) and log p(all O) [B], exactly, from cumulative sums: the all-O score plus what changes."""
    if crf.num_tags != 3:
        raise ValueError(f"span_log_probs: crf.num_tags={crf.num_tags}: BIO spans need 3 tags")
    if max_answer_length < 1:
        raise ValueError(f"span_log_probs: max_answer_length={max_answer_length}: must be at least 1")
    log_z = crf.log_partition(emissions, context_mask)
    emissions, _ = crf._prepare(emissions, context_mask)
    start, end, trans = crf._params(emissions.dtype)
    batch, length, _ = emissions.shape
    first, last, n = _context_bounds(context_mask)
    context = context_mask.bool()
    e_o, e_b, e_i = emissions.unbind(-1)
    o, b, i_ = TAG_O, TAG_B, TAG_I

    all_o = start[o] + torch.where(context, e_o, 0.0).sum(1) + (n - 1) * trans[o, o] + end[o]
    all_o = torch.where(n > 0, all_o, 0.0)

    span_len = min(max_answer_length, length)
    i = torch.arange(length, device=emissions.device).view(1, length, 1)
    a = torch.arange(span_len, device=emissions.device).view(1, 1, span_len)
    j = i + a
    cum_i = torch.where(context, e_i - e_o, 0.0).cumsum(1)  # sum over I positions via differences
    jc = j.clamp(max=length - 1).expand(batch, length, span_len)
    inner_emit = cum_i.gather(1, jc.flatten(1)).view(batch, length, span_len) - cum_i.unsqueeze(-1)
    delta = (e_b - e_o).unsqueeze(-1) + inner_emit
    at_start = i == first.view(batch, 1, 1)
    delta = delta + torch.where(at_start, start[b] - start[o], trans[o, b] - trans[o, o])
    inner = torch.where(a > 0, trans[b, i_] + (a - 1) * trans[i_, i_] - a * trans[o, o], 0.0)
    at_end = j == last.view(batch, 1, 1)
    exit_end = torch.where(a > 0, end[i_], end[b]) - end[o]
    exit_out = torch.where(a > 0, trans[i_, o], trans[b, o]) - trans[o, o]
    delta = delta + inner + torch.where(at_end, exit_end, exit_out)
    valid = (i >= first.view(batch, 1, 1)) & (j <= last.view(batch, 1, 1))
    spans = torch.where(valid, all_o.view(batch, 1, 1) + delta - log_z.view(batch, 1, 1), float("-inf"))
    return spans, all_o - log_z


@torch.no_grad()
def crf_candidates(
    crf: CRF, emissions: Tensor, context_mask: Tensor, n_best: int = 20, max_answer_length: int = 30
) -> WindowCandidates:
    """Top ``n_best`` spans of every window by log p(span) and the null score log p(all O), computed
    in fp32 whatever the autocast region around it."""
    with torch.autocast(device_type=emissions.device.type, enabled=False):
        spans, null = span_log_probs(crf, emissions.float(), context_mask.bool(), max_answer_length)
    batch, length, span_len = spans.shape
    flat = spans.flatten(1)
    k = min(n_best, flat.shape[1])
    scores, index = flat.topk(k, dim=1)
    starts = torch.where(torch.isfinite(scores), index // span_len, 0)
    ends = torch.where(torch.isfinite(scores), starts + index % span_len, 0)
    pad = n_best - k
    if pad > 0:
        scores = torch.cat([scores, scores.new_full((batch, pad), float("-inf"))], 1)
        starts = torch.cat([starts, starts.new_zeros(batch, pad)], 1)
        ends = torch.cat([ends, ends.new_zeros(batch, pad)], 1)
    return WindowCandidates(
        scores=scores.float().cpu().numpy(),
        starts=starts.int().cpu().numpy(),
        ends=ends.int().cpu().numpy(),
        null_scores=null.float().cpu().numpy(),
    )
