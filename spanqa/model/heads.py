"""The two answer heads on top of the encoder's hidden states: start/end span logits, or BIO tags + a CRF.

Both return a dict of fp32 tensors whatever the encoder's dtype (fp16/bf16 logits would make the loss and
the scores that compare windows and the null answer lose precision). Turning them into answer candidates
is evaluation's job (`spanqa.eval.candidates`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spanqa.model.crf import CRF, TAG_B, TAG_I, TAG_O

NUM_BIO_TAGS = 3  # O, B, I (spanqa.model.crf.TAG_O/TAG_B/TAG_I)


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
    """Emissions over BIO tags on the context tokens and a linear-chain CRF; the loss is the mean negative
    log-likelihood of the gold tags (one B I* block, or all O for no answer)."""

    name = "crf"

    def __init__(self, hidden_size: int, initializer_range: float = 0.02) -> None:
        super().__init__()
        self.emission = nn.Linear(hidden_size, NUM_BIO_TAGS)
        _init_linear(self.emission, initializer_range)
        self.crf = CRF(NUM_BIO_TAGS)

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        context_mask: Tensor,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> dict[str, Tensor]:
        emissions = self.emission(hidden).float()
        outputs = {"emissions": emissions}
        if start_positions is not None:
            tags = bio_tags(start_positions, end_positions, context_mask)
            # The forward-algorithm sums must stay fp32 even inside an fp16/bf16 autocast region.
            with torch.autocast(device_type=emissions.device.type, enabled=False):
                log_likelihood = self.crf(emissions, tags, context_mask.bool(), reduction="mean")
            outputs["loss"] = -log_likelihood
        return outputs


def bio_tags(start_positions: Tensor, end_positions: Tensor, context_mask: Tensor) -> Tensor:
    """BIO tags [B, T] (O=0, B=1, I=2) of each window's answer; start 0 (the CLS index) means all O.

    Labels are trusted here (the window store checks them when it is opened): checking them per batch
    would wait for the device at every step.
    """
    context = context_mask.bool()
    length = context.shape[1]
    starts = start_positions.long().view(-1, 1)
    ends = end_positions.long().view(-1, 1)
    positions = torch.arange(length, device=context.device).view(1, length)
    inside = (starts <= positions) & (positions <= ends) & context & (starts > 0)
    return torch.where(inside, torch.where(positions == starts, TAG_B, TAG_I), TAG_O)


HEADS: dict[str, type[nn.Module]] = {"span": SpanHead, "crf": CRFHead}  # keys: HEAD_NAMES, in order
