"""The CRF head's answer candidates: the exact log-probability of every one-span tagging of a window.

Under the CRF, a window's answer is a path O* B I* O* over its context tokens (or all O, no answer; the
one-span scheme tags the O after the answer apart). Every such path differs from the no-answer path in
a few transitions and emissions, so the score of all spans at once is the no-answer score plus
differences read off cumulative sums: no decoding per span.
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
    crf: CRF,
    emissions: Tensor,
    context_mask: Tensor,
    max_answer_length: int,
    states: tuple[int, int, int, int] = (TAG_O, TAG_B, TAG_I, TAG_O),
) -> tuple[Tensor, Tensor]:
    """log p(path of the span i..i+a) as [B, T, A] (-inf where not a span inside the context) and
    log p(no answer) [B], exactly, from cumulative sums: the no-answer score plus what changes.

    `states` = (before, B, I, after) are the tags of a span's path, before* B I* after*, and no answer
    is `before` throughout: (O, B, I, O) for BIO tags, (O, B, I, O-after) for the one-span scheme
    (`spanqa.model.tagging`)."""
    if min(states) < 0 or max(states) >= crf.num_tags:
        raise ValueError(f"span_log_probs: crf.num_tags={crf.num_tags} has no tags {states}")
    if max_answer_length < 1:
        raise ValueError(f"span_log_probs: max_answer_length={max_answer_length}: must be at least 1")
    log_z = crf.log_partition(emissions, context_mask)
    emissions, _ = crf._prepare(emissions, context_mask)
    start, end, trans = crf._params(emissions.dtype)
    batch, length, _ = emissions.shape
    first, last, n = _context_bounds(context_mask)
    context = context_mask.bool()
    o, b, i_, after = states
    e_o, e_b, e_i, e_after = (emissions[..., tag] for tag in states)

    null = start[o] + torch.where(context, e_o, 0.0).sum(1) + (n - 1) * trans[o, o] + end[o]
    null = torch.where(n > 0, null, 0.0)

    span_len = min(max_answer_length, length)
    i = torch.arange(length, device=emissions.device).view(1, length, 1)
    a = torch.arange(span_len, device=emissions.device).view(1, 1, span_len)
    j = i + a
    jc = j.clamp(max=length - 1).expand(batch, length, span_len)

    def cumulative(x: Tensor) -> tuple[Tensor, Tensor]:  # [B, T]: through position t; at j (clamped)
        cum = torch.where(context, x, 0.0).cumsum(1)
        return cum, cum.gather(1, jc.flatten(1)).view(batch, length, span_len)

    # emissions: B at i instead of `before`, I over i+1..j, `after` over j+1..last (differences of
    # cumulative sums of differences: no large sums cancelling)
    cum_i, cum_i_at_j = cumulative(e_i - e_o)
    cum_after, cum_after_at_j = cumulative(e_after - e_o)
    delta = (e_b - e_o).unsqueeze(-1) + cum_i_at_j - cum_i.unsqueeze(-1)
    delta = delta + cum_after[:, -1].view(batch, 1, 1) - cum_after_at_j
    # transitions: into B, through the span, out of it
    at_start = i == first.view(batch, 1, 1)
    delta = delta + torch.where(at_start, start[b] - start[o], trans[o, b] - trans[o, o])
    delta = delta + torch.where(a > 0, trans[b, i_] + (a - 1) * trans[i_, i_] - a * trans[o, o], 0.0)
    at_end = j == last.view(batch, 1, 1)
    exit_end = torch.where(a > 0, end[i_], end[b]) - end[o]
    afterwards = (last.view(batch, 1, 1) - j - 1) * (trans[after, after] - trans[o, o]) + end[after] - end[o]
    exit_out = torch.where(a > 0, trans[i_, after], trans[b, after]) - trans[o, o] + afterwards
    delta = delta + torch.where(at_end, exit_end, exit_out)
    valid = (i >= first.view(batch, 1, 1)) & (j <= last.view(batch, 1, 1))
    spans = torch.where(valid, null.view(batch, 1, 1) + delta - log_z.view(batch, 1, 1), float("-inf"))
    return spans, null - log_z


@torch.no_grad()
def crf_candidates(
    crf: CRF,
    emissions: Tensor,
    context_mask: Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    states: tuple[int, int, int, int] = (TAG_O, TAG_B, TAG_I, TAG_O),
) -> WindowCandidates:
    """Top ``n_best`` spans of every window by log p(span) and the null score log p(no answer),
    computed in fp32 whatever the autocast region around it (`states`: see `span_log_probs`)."""
    with torch.autocast(device_type=emissions.device.type, enabled=False):
        spans, null = span_log_probs(crf, emissions.float(), context_mask.bool(), max_answer_length, states)
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
