"""The CRF head's tag schemes: which tags a window's context tokens take, and which paths are allowed.

A window's answer is a path (before)* B I* (after)* over its context tokens; no answer is the path of
`before` tags only. The schemes differ in what else the CRF may put probability on:

- ``bio``: O, B, I and no constraint (the classic BERT-CRF tagger): paths with several spans, or an I
  after an O, take probability too, and an answer competes with all of them.
- ``bio_masked``: O, B, I with the BIO constraints (no I after O or at the start; AllenNLP's
  `allowed_transitions("BIO")`), applied in training as in decoding (Masked CRF): several spans remain.
- ``span``: O-before, B, I, O-after, constrained so that the only paths are "no answer"
  (O-before throughout) and exactly one span: the CRF's distribution is then a distribution over the
  window's answers, null included, as the span head's softmax is.
- ``span_end`` (the default, measured best: the README's CRF head section): ``span`` with the answer's
  last token tagged apart, O-before* (B I* E | S) O-after*, and an emission of its own for E (S, a
  one-token answer, scores B's plus E's): a span then scores its start's emission plus its end's plus
  what lies inside and around it, the span head's start + end logits being the case where I and O
  score alike. Under ``span`` the end is seen only through the tokens on either side of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O

TAG_O_AFTER = 3  # the `span` scheme's O after the answer (TAG_O is its O before, or of no answer)
TAG_E, TAG_S = 4, 5  # `span_end`: the last token of an answer of two or more, and a one-token answer


@dataclass(frozen=True)
class SpanStates:
    """The tags of an answer's path, before* (begin inside* end | single) after*; no answer is
    `before` throughout. Schemes without an end tag have end = inside and single = begin."""

    before: int
    begin: int
    inside: int
    end: int
    single: int
    after: int


@dataclass(frozen=True)
class Tagging:
    name: str
    num_tags: int
    after: int  # the tag of context tokens after the answer (TAG_O or TAG_O_AFTER)
    # the emissions (outputs of the head's linear layer) whose sum scores each tag: O-after shares O's
    emissions_of_tag: tuple[tuple[int, ...], ...] = ((TAG_O,), (TAG_B,), (TAG_I,))
    allowed_start: tuple[bool, ...] | None = None
    allowed_transitions: tuple[tuple[bool, ...], ...] | None = None  # [from][to]
    allowed_end: tuple[bool, ...] | None = None
    end_tags: tuple[int, int] | None = None  # (end, single) when the answer's last token has tags of its own

    @property
    def states(self) -> SpanStates:
        end, single = self.end_tags or (TAG_I, TAG_B)
        return SpanStates(TAG_O, TAG_B, TAG_I, end, single, self.after)

    @property
    def num_emissions(self) -> int:
        return max(max(channels) for channels in self.emissions_of_tag) + 1

    def tag_emissions(self, emissions: Tensor) -> Tensor:
        """[B, T, num_emissions] -> [B, T, num_tags]: each tag's score."""
        first = [channels[0] for channels in self.emissions_of_tag]
        if all(len(channels) == 1 for channels in self.emissions_of_tag):
            return emissions if first == list(range(self.num_emissions)) else emissions[..., first]
        # tags of two emissions: gather each tag's first and second (a zero column for tags of one)
        padded = torch.cat([emissions, emissions.new_zeros(emissions.shape[:-1] + (1,))], -1)
        zero = self.num_emissions
        second = [channels[1] if len(channels) > 1 else zero for channels in self.emissions_of_tag]
        return padded[..., first] + padded[..., second]

    def crf(self) -> CRF:
        def mask(rows):
            return None if rows is None else torch.tensor(rows, dtype=torch.bool)

        return CRF(
            self.num_tags, mask(self.allowed_start), mask(self.allowed_transitions), mask(self.allowed_end)
        )

    def tags(self, start_positions: Tensor, end_positions: Tensor, context_mask: Tensor) -> Tensor:
        """Gold tags [B, T] of each window's answer; start 0 (the CLS index) means no answer.

        Labels are trusted here (the window store checks them when it is opened): checking them per batch
        would wait for the device at every step.
        """
        st = self.states
        context = context_mask.bool()
        length = context.shape[1]
        starts = start_positions.long().view(-1, 1)
        ends = end_positions.long().view(-1, 1)
        positions = torch.arange(length, device=context.device).view(1, length)
        answered = starts > 0
        inside = (starts <= positions) & (positions <= ends) & context & answered
        first = torch.where(starts == ends, st.single, st.begin)
        answer = torch.where(positions == starts, first, torch.where(positions == ends, st.end, st.inside))
        tags = torch.where(inside, answer, st.before)
        if st.after != st.before:
            tags = torch.where(answered & (positions > ends) & context, st.after, tags)
        return tags


_T, _F = True, False
TAGGINGS = {
    "bio": Tagging("bio", 3, TAG_O),
    "bio_masked": Tagging(
        "bio_masked",
        3,
        TAG_O,
        allowed_start=(_T, _T, _F),
        # to:                 O   B   I
        allowed_transitions=((_T, _T, _F), (_T, _T, _T), (_T, _T, _T)),  # from O, B, I
    ),
    "span": Tagging(
        "span",
        4,
        TAG_O_AFTER,
        # one O score before and after the answer: were they apart, a shift of their difference would
        # move every span's score by its distance from the window's ends (a position prior the encoder
        # would have to keep balanced at every token)
        emissions_of_tag=((TAG_O,), (TAG_B,), (TAG_I,), (TAG_O,)),
        allowed_start=(_T, _T, _F, _F),
        # to:                 O   B   I   O-after
        allowed_transitions=(
            (_T, _T, _F, _F),  # from O (before): more O, or the answer begins
            (_F, _F, _T, _T),  # from B: the answer goes on or ends
            (_F, _F, _T, _T),  # from I
            (_F, _F, _F, _T),  # from O-after: nothing but O-after
        ),
    ),
    "span_end": Tagging(
        "span_end",
        6,
        TAG_O_AFTER,
        # emissions O, B, I, E (channel 3); O-after shares O's, S is B + E: a one-token answer both
        # starts and ends there
        emissions_of_tag=((TAG_O,), (TAG_B,), (TAG_I,), (TAG_O,), (3,), (TAG_B, 3)),
        allowed_start=(_T, _T, _F, _F, _F, _T),
        # to:                 O   B   I   Oa  E   S
        allowed_transitions=(
            (_T, _T, _F, _F, _F, _T),  # from O (before): more O, or the answer begins
            (_F, _F, _T, _F, _T, _F),  # from B: the answer goes on or ends at the next token
            (_F, _F, _T, _F, _T, _F),  # from I
            (_F, _F, _F, _T, _F, _F),  # from O-after: nothing but O-after
            (_F, _F, _F, _T, _F, _F),  # from E: the answer is over
            (_F, _F, _F, _T, _F, _F),  # from S
        ),
        allowed_end=(_T, _F, _F, _T, _T, _T),  # an answer is closed by E or S
        end_tags=(TAG_E, TAG_S),
    ),
}
