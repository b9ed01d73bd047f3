"""The QA model (a `transformers` encoder + a span or CRF head), and its weights in Hugging Face format.

The span head saves as transformers' own `AutoModelForQuestionAnswering` checkpoint (encoder +
`qa_outputs`), so anything that reads Hugging Face QA models reads it; the CRF head saves the encoder plus
`crf_head.safetensors`. `spanqa.export` wraps these with the tokenizer and spanqa's settings.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spanqa.model import compat
from spanqa.model.heads import DEFAULT_TAGGING, HEADS, CRFHead

CRF_HEAD_FILE = "crf_head.safetensors"
TAGGING_KEY = "crf_tags"  # in the CRF head file's metadata: the tag scheme its weights are for


# Encoders whose position ids start after the padding index (RoBERTa's offset): fewer usable positions.
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer")


def encoder_positions(name_or_path: str) -> int | None:
    """How many tokens the encoder's position embeddings take (None: no such limit in its config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    if config.model_type in POSITION_OFFSET_TYPES:
        positions -= (config.pad_token_id or 0) + 1
    return positions


class QAModel(nn.Module):
    """Encoder + answer head. `forward` takes a collated batch (minus `window_index`) and returns fp32
    outputs: "start_logits"/"end_logits" [B, L] (span) or "emissions" [B, L, 3] (crf), and "loss" when
    the gold positions are given."""

    def __init__(self, encoder: nn.Module, head_name: str, crf_tags: str = DEFAULT_TAGGING) -> None:
        super().__init__()
        if head_name not in HEADS:
            raise ValueError(f"unknown head {head_name!r} (choose from {', '.join(HEADS)})")
        config = encoder.config
        self.encoder = encoder
        self.head_name = head_name
        init_range = getattr(config, "initializer_range", 0.02)
        if head_name == "crf":
            self.head = CRFHead(config.hidden_size, init_range, crf_tags)
        else:
            self.head = HEADS[head_name](config.hidden_size, init_range)
        # Encoders without segment embeddings (DistilBERT) take no token_type_ids at all.
        self._takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    @property
    def config(self):
        return self.encoder.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        context_mask: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if (start_positions is None) != (end_positions is None):
            raise ValueError("start_positions and end_positions go together: give both or neither")
        if context_mask is None:
            raise ValueError("context_mask is required: both heads answer from context tokens only")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_token_types and token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        return self.head(hidden, attention_mask, context_mask, start_positions, end_positions)


def build_model(
    model_name_or_path: str,
    head: str = "span",
    attn_implementation: str = "sdpa",
    crf_tags: str = DEFAULT_TAGGING,
) -> QAModel:
    """A pretrained encoder (local directory or hub name; never remote code) with a fresh `head` (the CRF
    head with the tag scheme `crf_tags`), in train mode and fp32 (mixed precision is DeepSpeed's
    business, and it wants fp32 master weights).
    Raises what transformers raises for a model it cannot load (OSError, ValueError, ...)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r} (choose from {', '.join(HEADS)})")
    encoder = load_encoder(model_name_or_path, attn_implementation)
    _drop_pooler(encoder)
    return QAModel(encoder, head, crf_tags).train()


def load_encoder(model_name_or_path: str, attn_implementation: str = "sdpa", **kwargs: Any) -> nn.Module:
    """`AutoModel.from_pretrained` in fp32, falling back from SDPA to eager attention for architectures
    without SDPA support (spanqa.model.compat)."""
    from transformers import AutoModel

    return compat.from_pretrained(AutoModel, model_name_or_path, attn_implementation, **kwargs)


def _drop_pooler(encoder: nn.Module) -> None:
    # BERT's pooler (CLS -> tanh) is unused by both heads; as in transformers' *ForQuestionAnswering it
    # goes, so that no parameter stays without a gradient under DeepSpeed.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


# ----------------------------------------------------------------------------------- save and load


def save_pretrained(model: QAModel, out_dir: str | Path) -> None:
    """Write `model`'s weights into the directory `out_dir` in Hugging Face format (safetensors, fp32)."""
    if not isinstance(model, QAModel):
        raise TypeError(f"save_pretrained needs a QAModel, got {type(model).__name__}")
    if model.head_name == "span":
        _save_span_model(model, Path(out_dir))
    else:
        _save_crf_model(model, Path(out_dir))


def _fp32_state(module: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in module.state_dict().items()
    }


def _save_span_model(model: QAModel, out: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    # A fresh fp32 QA model of the same architecture, filled with our weights: the export is then exactly
    # transformers' checkpoint, whatever dtype DeepSpeed left our modules in. Built under a private RNG
    # state: its (overwritten) random init must not draw from the training run's streams.
    with torch.random.fork_rng(devices=[]):
        qa = compat.from_config(AutoModelForQuestionAnswering, copy.deepcopy(model.encoder.config))
    missing, unexpected = qa.base_model.load_state_dict(_fp32_state(model.encoder), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder does not fit {type(qa).__name__}: missing {missing}, unexpected {unexpected}"
        )
    qa.qa_outputs.load_state_dict(_fp32_state(model.head.qa_outputs))
    compat.save_pretrained(qa, str(out))


def _save_crf_model(model: QAModel, out: Path) -> None:
    from transformers import AutoModel

    config = copy.deepcopy(model.encoder.config)
    with torch.random.fork_rng(devices=[]):
        encoder = compat.from_config(AutoModel, config, **compat.no_pooler_kwargs(config))
    encoder.load_state_dict(_fp32_state(model.encoder))
    compat.save_pretrained(encoder, str(out))
    weights = {k: v.contiguous() for k, v in _fp32_state(model.head).items()}
    save_file(weights, str(out / CRF_HEAD_FILE), metadata={TAGGING_KEY: model.head.tagging.name})


def from_pretrained(model_dir: str | Path, head: str, attn_implementation: str = "sdpa") -> QAModel:
    """The QAModel saved by `save_pretrained` in `model_dir`, in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering

    model_dir = str(model_dir)
    if head == "span":
        qa = compat.from_pretrained(AutoModelForQuestionAnswering, model_dir, attn_implementation)
        model = QAModel(qa.base_model, "span")
        model.head.qa_outputs.load_state_dict(qa.qa_outputs.state_dict())
    else:
        no_pooler = compat.no_pooler_kwargs(AutoConfig.from_pretrained(model_dir))
        encoder = compat.from_pretrained(AutoModel, model_dir, attn_implementation, **no_pooler)
        head_file = str(Path(model_dir) / CRF_HEAD_FILE)
        model = QAModel(encoder, head, _saved_tagging(head_file))
        model.head.load_state_dict(load_file(head_file))
    return model.eval()


def _saved_tagging(head_file: str) -> str:
    """The tag scheme a CRF head file was saved with; files from before schemes existed hold BIO weights."""
    with safe_open(head_file, framework="pt") as f:
        return (f.metadata() or {}).get(TAGGING_KEY, "bio")
