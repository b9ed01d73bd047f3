"""The CRF head's tag schemes: which tags a window's context tokens take, and which paths are allowed.

A window's answer is a path (before)* B I* (after)* over its context tokens; no answer is the path of
`before` tags only. The schemes differ in what else the CRF may put probability on:

- ``bio``: O, B, I and no constraint (the classic BERT-CRF tagger): paths with several spans, or an I
  after an O, take probability too, and an answer competes with all of them.
- ``bio_masked``: O, B, I with the BIO constraints (no I after O or at the start; AllenNLP's
  `allowed_transitions("BIO")`), applied in training as in decoding (Masked CRF): several spans remain.
- ``span`` (the default): O-before, B, I, O-after, constrained so that the only paths are "no answer"
  (O-before throughout) and exactly one span: the CRF's distribution is then a distribution over the
  window's answers, null included, as the span head's softmax is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O

TAG_O_AFTER = 3  # the `span` scheme's O after the answer (TAG_O is its O before, or of no answer)


@dataclass(frozen=True)
class Tagging:
    name: str
    num_tags: int
    after: int  # the tag of context tokens after the answer (TAG_O or TAG_O_AFTER)
    # the emission (output of the head's linear layer) each tag is scored by: O-after shares O's
    emission_of_tag: tuple[int, ...] = (TAG_O, TAG_B, TAG_I)
    allowed_start: tuple[bool, ...] | None = None
    allowed_transitions: tuple[tuple[bool, ...], ...] | None = None  # [from][to]
    allowed_end: tuple[bool, ...] | None = None

    @property
    def states(self) -> tuple[int, int, int, int]:
        """(before, B, I, after): the tags of an answer's path; no answer is `before` throughout."""
        return TAG_O, TAG_B, TAG_I, self.after

    @property
    def num_emissions(self) -> int:
        return max(self.emission_of_tag) + 1

    def tag_emissions(self, emissions: Tensor) -> Tensor:
        """[B, T, num_emissions] -> [B, T, num_tags]: each tag's score."""
        if self.emission_of_tag == tuple(range(self.num_emissions)):
            return emissions
        return emissions[..., list(self.emission_of_tag)]

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
        context = context_mask.bool()
        length = context.shape[1]
        starts = start_positions.long().view(-1, 1)
        ends = end_positions.long().view(-1, 1)
        positions = torch.arange(length, device=context.device).view(1, length)
        answered = starts > 0
        inside = (starts <= positions) & (positions <= ends) & context & answered
        tags = torch.where(inside, torch.where(positions == starts, TAG_B, TAG_I), TAG_O)
        if self.after != TAG_O:
            tags = torch.where(answered & (positions > ends) & context, self.after, tags)
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
        emission_of_tag=(TAG_O, TAG_B, TAG_I, TAG_O),
        allowed_start=(_T, _T, _F, _F),
        # to:                 O   B   I   O-after
        allowed_transitions=(
            (_T, _T, _F, _F),  # from O (before): more O, or the answer begins
            (_F, _F, _T, _T),  # from B: the answer goes on or ends
            (_F, _F, _T, _T),  # from I
            (_F, _F, _F, _T),  # from O-after: nothing but O-after
        ),
    ),
}
