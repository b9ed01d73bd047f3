"""The two answer heads on top of the encoder's hidden states: start/end span logits, or BIO tags + a CRF.

Both return a dict of fp32 tensors whatever the encoder's dtype (fp16/bf16 logits would make the loss and
the scores that compare windows and the null answer lose precision). Turning them into answer candidates
is evaluation's job (`spanqa.eval.candidates`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spanqa.model import CRF_TAGGINGS
from spanqa.model.tagging import TAGGINGS

DEFAULT_TAGGING = CRF_TAGGINGS[0]


def _init_linear(layer: nn.Linear, std: float) -> None:
    # BERT's initialisation, so that a head starts like transformers' own *ForQuestionAnswering head
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.zeros_(layer.bias)


class SpanHead(nn.Module):
    """BERT/SpanBERT's QA head: one linear layer to start and end logits, cross-entropy against the gold
    start and end (the CLS index 0 when the window holds no answer)."""

    name = "span"

    def __init__(self, hidden_size: int, initializer_range: float = 0.02) -> None:
        super().__init__()
        # Named as in transformers' *ForQuestionAnswering, so that the export is that model's checkpoint.
        self.qa_outputs = nn.Linear(hidden_size, 2)
        _init_linear(self.qa_outputs, initializer_range)

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        context_mask: Tensor,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> dict[str, Tensor]:
        logits = self.qa_outputs(hidden).float()
        start_logits, end_logits = logits[..., 0].contiguous(), logits[..., 1].contiguous()
        outputs = {"start_logits": start_logits, "end_logits": end_logits}
        if start_positions is not None:
            outputs["loss"] = span_loss(
                start_logits, end_logits, attention_mask, start_positions, end_positions
            )
        return outputs


def span_loss(
    start_logits: Tensor,
    end_logits: Tensor,
    attention_mask: Tensor,
    start_positions: Tensor,
    end_positions: Tensor,
) -> Tensor:
    """Mean of the start and end cross-entropies (each averaged over the batch), softmax over the real
    tokens only: padding must not take probability mass, or the loss would depend on the batch's length."""
    padding = ~attention_mask.bool()
    lowest = torch.finfo(start_logits.dtype).min
    start_loss = nn.functional.cross_entropy(
        start_logits.masked_fill(padding, lowest), start_positions.long()
    )
    end_loss = nn.functional.cross_entropy(end_logits.masked_fill(padding, lowest), end_positions.long())
    return (start_loss + end_loss) / 2


class CRFHead(nn.Module):
    """Emissions over the tags of a tag scheme (`spanqa.model.tagging`) on the context tokens and a
    linear-chain CRF; the loss is the mean over windows of the negative log-likelihood of the gold tags
    (one answer span, or no answer)."""

    name = "crf"

    def __init__(
        self, hidden_size: int, initializer_range: float = 0.02, tags: str = DEFAULT_TAGGING
    ) -> None:
        super().__init__()
        if tags not in TAGGINGS:
            raise ValueError(f"unknown CRF tag scheme {tags!r} (choose from {', '.join(TAGGINGS)})")
        self.tagging = TAGGINGS[tags]
        self.emission = nn.Linear(hidden_size, self.tagging.num_emissions)
        _init_linear(self.emission, initializer_range)
        self.crf = self.tagging.crf()

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        context_mask: Tensor,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> dict[str, Tensor]:
        emissions = self.tagging.tag_emissions(self.emission(hidden).float())  # [B, L, num_tags]
        outputs = {"emissions": emissions}
        if start_positions is not None:
            tags = self.tagging.tags(start_positions, end_positions, context_mask)
            # The forward-algorithm sums must stay fp32 even inside an fp16/bf16 autocast region.
            with torch.autocast(device_type=emissions.device.type, enabled=False):
                log_likelihood = self.crf(emissions, tags, context_mask.bool(), reduction="mean")
            outputs["loss"] = -log_likelihood
        return outputs


def bio_tags(start_positions: Tensor, end_positions: Tensor, context_mask: Tensor) -> Tensor:
    """BIO tags [B, T] (O=0, B=1, I=2) of each window's answer; start 0 (the CLS index) means all O."""
    return TAGGINGS["bio"].tags(start_positions, end_positions, context_mask)


HEADS: dict[str, type[nn.Module]] = {"span": SpanHead, "crf": CRFHead}  # keys: HEAD_NAMES, in order
