"""The two answer heads on top of the encoder's hidden states: start/end span logits, or BIO tags + a CRF.

Both return a dict of fp32 tensors whatever the encoder's dtype (fp16/bf16 logits would make the loss and
the scores that compare windows and the null answer lose precision), and both turn their outputs into the
head-independent `WindowCandidates` that answer selection consumes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spanqa.eval.candidates import WindowCandidates
from spanqa.model.crf import CRF, bio_tags
from spanqa.model.crf import span_candidates as crf_span_candidates

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

    @torch.no_grad()
    def candidates(
        self, outputs: dict[str, Tensor], context_mask: Tensor, n_best: int = 20, max_answer_length: int = 30
    ) -> WindowCandidates:
        from spanqa.eval.postprocess import span_candidates

        return span_candidates(
            _numpy32(outputs["start_logits"]),
            _numpy32(outputs["end_logits"]),
            context_mask.bool().cpu().numpy(),
            n_best=n_best,
            max_answer_length=max_answer_length,
        )


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

    @torch.no_grad()
    def candidates(
        self, outputs: dict[str, Tensor], context_mask: Tensor, n_best: int = 20, max_answer_length: int = 30
    ) -> WindowCandidates:
        with torch.autocast(device_type=outputs["emissions"].device.type, enabled=False):
            return crf_span_candidates(
                self.crf,
                outputs["emissions"].float(),
                context_mask.bool(),
                n_best=n_best,
                max_answer_length=max_answer_length,
            )


HEADS: dict[str, type[nn.Module]] = {"span": SpanHead, "crf": CRFHead}


def _numpy32(tensor: Tensor):
    return tensor.detach().float().cpu().numpy()
