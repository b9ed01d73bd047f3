"""The CRF head's answer candidates: the exact log-probability of every one-span tagging of a window.

Under the CRF, a window's answer is a path O* B I* O* over its context tokens (or all O, no answer; the
one-span schemes tag the O after the answer apart, and `span_end` the answer's last token). Every
such path differs from the no-answer path in a few transitions and emissions, so the score of all
spans at once is the no-answer score plus differences read off cumulative sums: no decoding per span.
"""

from __future__ import annotations

from dataclasses import astuple

import torch
from torch import Tensor

from spanqa.eval.candidates import WindowCandidates
from spanqa.model.crf import CRF
from spanqa.model.tagging import TAGGINGS, SpanStates

BIO = TAGGINGS["bio"].states


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
    crf: CRF, emissions: Tensor, context_mask: Tensor, max_answer_length: int, states: SpanStates = BIO
) -> tuple[Tensor, Tensor]:
    """log p(path of the span i..i+a) as [B, T, A] (-inf where not a span inside the context) and
    log p(no answer) [B], exactly, from cumulative sums: the no-answer score plus what changes.

    `states` are the tags of a span's path, before* (begin inside* end | single) after*, and no answer
    is `before` throughout (`spanqa.model.tagging.SpanStates`, the scheme's `states`)."""
    tags = astuple(states)
    if min(tags) < 0 or max(tags) >= crf.num_tags:
        raise ValueError(f"span_log_probs: crf.num_tags={crf.num_tags} has no tags {tags}")
    if max_answer_length < 1:
        raise ValueError(f"span_log_probs: max_answer_length={max_answer_length}: must be at least 1")
    log_z = crf.log_partition(emissions, context_mask)
    emissions, _ = crf._prepare(emissions, context_mask)
    start, end, trans = crf._params(emissions.dtype)
    batch, length, _ = emissions.shape
    first, last, n = _context_bounds(context_mask)
    context = context_mask.bool()
    o, b, i_, e_, s_, after = tags
    e_o = emissions[..., o]

    null = start[o] + torch.where(context, e_o, 0.0).sum(1) + (n - 1) * trans[o, o] + end[o]
    null = torch.where(n > 0, null, 0.0)

    span_len = min(max_answer_length, length)
    i = torch.arange(length, device=emissions.device).view(1, length, 1)
    a = torch.arange(span_len, device=emissions.device).view(1, 1, span_len)
    j = i + a
    jc = j.clamp(max=length - 1).expand(batch, length, span_len)
    single = a == 0

    def at_j(x: Tensor) -> Tensor:  # [B, T] -> [B, T, A]: x at the span's last position (clamped)
        return x.gather(1, jc.flatten(1)).view(batch, length, span_len)

    def cumulative(x: Tensor) -> tuple[Tensor, Tensor]:  # [B, T]: through position t; at j
        cum = torch.where(context, x, 0.0).cumsum(1)
        return cum, at_j(cum)

    def differs(tag: int) -> Tensor:  # [B, T]: the tag's emission instead of `before`'s
        return emissions[..., tag] - e_o

    # emissions (differences of cumulative sums of differences: no large sums cancelling): B (S for one
    # token) at i, I over i+1..j, then E instead of I at j, `after` over j+1..last. Each tag of its own
    # (S, E) is a correction that is exactly 0 in the schemes without it: their figures stay bit for bit.
    cum_i, cum_i_at_j = cumulative(differs(i_))
    cum_after, cum_after_at_j = cumulative(differs(after))
    delta = torch.where(single, differs(s_).unsqueeze(-1), differs(b).unsqueeze(-1)) + cum_i_at_j
    delta = delta - cum_i.unsqueeze(-1)
    delta = delta + torch.where(single, 0.0, at_j(emissions[..., e_] - emissions[..., i_]))
    delta = delta + cum_after[:, -1].view(batch, 1, 1) - cum_after_at_j
    delta = _add_transitions(delta, (start, end, trans), tags, i, a, first, last)
    valid = (i >= first.view(batch, 1, 1)) & (j <= last.view(batch, 1, 1))
    spans = torch.where(valid, null.view(batch, 1, 1) + delta - log_z.view(batch, 1, 1), float("-inf"))
    return spans, null - log_z


def _add_transitions(
    delta: Tensor,
    params: tuple[Tensor, Tensor, Tensor],
    tags: tuple,
    i: Tensor,
    a: Tensor,
    first: Tensor,
    last: Tensor,
) -> Tensor:
    """`delta` [B, T, A] plus what the span i..i+a's path changes in the no-answer path's transition
    scores: into the span, through it (B I* with E for the last I), out of it (added one by one, in
    the order of the schemes' figures before `span_end`). `params`: the CRF's (start, end, trans)."""
    start, end, trans = params
    o, b, i_, e_, s_, after = tags
    first, last = first.view(-1, 1, 1), last.view(-1, 1, 1)
    j, single = i + a, a == 0
    opening = torch.where(single, s_, b)
    closing = torch.where(single, s_, e_)
    delta = delta + torch.where(i == first, start[opening] - start[o], trans[o, opening] - trans[o, o])
    last_step = torch.where(a == 1, trans[b, e_] - trans[b, i_], trans[i_, e_] - trans[i_, i_])
    through = trans[b, i_] + (a - 1) * trans[i_, i_] - a * trans[o, o] + last_step
    delta = delta + torch.where(single, 0.0, through)
    exit_end = end[closing] - end[o]
    afterwards = (last - j - 1) * (trans[after, after] - trans[o, o]) + end[after] - end[o]
    exit_out = trans[closing, after] - trans[o, o] + afterwards
    return delta + torch.where(j == last, exit_end, exit_out)


@torch.no_grad()
def crf_candidates(
    crf: CRF,
    emissions: Tensor,
    context_mask: Tensor,
    n_best: int = 20,
    max_answer_length: int = 30,
    states: SpanStates = BIO,
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
