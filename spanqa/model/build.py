"""The QA model (a `transformers` encoder + a span or CRF head), and its export to / load from a directory.

The span head exports as transformers' own `AutoModelForQuestionAnswering` checkpoint (encoder +
`qa_outputs`), so anything that reads Hugging Face QA models reads it; the CRF head exports the encoder plus
`crf_head.safetensors`. Either way `spanqa_config.json` says which head and with which settings, and
`load_model` rebuilds the same `QAModel` without DeepSpeed.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spanqa.errors import SpanqaError
from spanqa.eval.candidates import WindowCandidates
from spanqa.model.heads import HEADS

SPANQA_CONFIG = "spanqa_config.json"
CRF_HEAD_FILE = "crf_head.safetensors"
EXPORT_FORMAT_VERSION = 1


class QAModel(nn.Module):
    """Encoder + answer head. `forward` takes a collated batch (minus `window_index`) and returns fp32
    outputs: "start_logits"/"end_logits" [B, L] (span) or "emissions" [B, L, 3] (crf), and "loss" when
    the gold positions are given."""

    def __init__(self, encoder: nn.Module, head_name: str) -> None:
        super().__init__()
        if head_name not in HEADS:
            raise SpanqaError(f"--head: unknown head {head_name!r} (choose from {', '.join(HEADS)})")
        config = encoder.config
        self.encoder = encoder
        self.head_name = head_name
        self.head = HEADS[head_name](config.hidden_size, getattr(config, "initializer_range", 0.02))
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

    def candidates(
        self, outputs: dict[str, Tensor], context_mask: Tensor, n_best: int = 20, max_answer_length: int = 30
    ) -> WindowCandidates:
        """The top `n_best` spans and the null score of every window in the batch (numpy, fp32)."""
        return self.head.candidates(outputs, context_mask, n_best=n_best, max_answer_length=max_answer_length)


def build_model(model_name_or_path: str, head: str = "span", attn_implementation: str = "sdpa") -> QAModel:
    """A pretrained encoder (local directory or hub name; never remote code) with a fresh `head`, in train
    mode and fp32 (mixed precision is DeepSpeed's business, and it wants fp32 master weights)."""
    if head not in HEADS:
        raise SpanqaError(f"--head: unknown head {head!r} (choose from {', '.join(HEADS)})")
    encoder = load_encoder(model_name_or_path, attn_implementation)
    _drop_pooler(encoder)
    return QAModel(encoder, head).train()


def load_encoder(model_name_or_path: str, attn_implementation: str = "sdpa", **kwargs: Any) -> nn.Module:
    """`AutoModel.from_pretrained` in fp32, falling back from SDPA to eager attention for architectures
    without SDPA support; anything that cannot load becomes one SpanqaError line naming the model."""
    from transformers import AutoModel

    _check_local_path(model_name_or_path)
    try:
        return _from_pretrained(AutoModel, model_name_or_path, attn_implementation, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise SpanqaError(
            f"--model {model_name_or_path}: cannot load the encoder: {_first_line(err)}"
        ) from err


def _from_pretrained(auto_class, name: str, attn_implementation: str, **kwargs: Any) -> nn.Module:
    load = dict(trust_remote_code=False, dtype=torch.float32, **kwargs)
    try:
        return auto_class.from_pretrained(name, attn_implementation=attn_implementation, **load)
    except ValueError as err:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(err):
            raise
        return auto_class.from_pretrained(name, attn_implementation="eager", **load)


def _check_local_path(name: str) -> None:
    # A path-like name that does not exist would otherwise be tried as a hub repo, with network retries.
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise SpanqaError(f"--model {name}: no such model directory")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _drop_pooler(encoder: nn.Module) -> None:
    # BERT's pooler (CLS -> tanh) is unused by both heads; as in transformers' *ForQuestionAnswering it
    # goes, so that no parameter stays without a gradient under DeepSpeed.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def _no_pooler_kwargs(config) -> dict[str, Any]:
    """`add_pooling_layer=False` for the encoder classes that take it (BERT, RoBERTa, ...), else nothing."""
    from transformers import AutoModel
    from transformers.models.auto.auto_factory import _get_model_class

    model_class = _get_model_class(config, AutoModel._model_mapping)
    takes_it = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if takes_it else {}


# ---------------------------------------------------------------------------------------------- export


def export_model(model: QAModel, tokenizer: Any, out_dir: str | Path, settings: dict) -> None:
    """Write `model` + `tokenizer` to `out_dir` in Hugging Face format (safetensors, fp32) with
    `spanqa_config.json` = {"head", **settings}. Atomic: a temporary directory renamed into place, an
    existing export replaced only once the new one is complete."""
    if not isinstance(model, QAModel):
        raise TypeError(f"export_model needs a QAModel, got {type(model).__name__}")
    if settings.get("head", model.head_name) != model.head_name:
        raise ValueError(f"settings say head {settings['head']!r} but the model has {model.head_name!r}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the export from the rest of a shared cluster
        if model.head_name == "span":
            _save_span_model(model, tmp)
        else:
            _save_crf_model(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        spanqa_config = {"format_version": EXPORT_FORMAT_VERSION, **settings, "head": model.head_name}
        (tmp / SPANQA_CONFIG).write_text(json.dumps(spanqa_config, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fp32_state(module: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in module.state_dict().items()
    }


def _save_span_model(model: QAModel, out: Path) -> None:
    from transformers import AutoModelForQuestionAnswering

    # A fresh fp32 QA model of the same architecture, filled with our weights: the export is then exactly
    # transformers' checkpoint, whatever dtype DeepSpeed left our modules in.
    qa = AutoModelForQuestionAnswering.from_config(copy.deepcopy(model.encoder.config), dtype=torch.float32)
    missing, unexpected = qa.base_model.load_state_dict(_fp32_state(model.encoder), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder does not fit {type(qa).__name__}: missing {missing}, unexpected {unexpected}"
        )
    qa.qa_outputs.load_state_dict(_fp32_state(model.head.qa_outputs))
    qa.save_pretrained(str(out))


def _save_crf_model(model: QAModel, out: Path) -> None:
    from transformers import AutoModel

    config = copy.deepcopy(model.encoder.config)
    encoder = AutoModel.from_config(config, dtype=torch.float32, **_no_pooler_kwargs(config))
    encoder.load_state_dict(_fp32_state(model.encoder))
    encoder.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in _fp32_state(model.head).items()}, str(out / CRF_HEAD_FILE))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def load_model(model_dir: str | Path, attn_implementation: str = "sdpa") -> tuple[QAModel, Any, dict]:
    """An exported model, its tokenizer and its `spanqa_config.json`, in eval mode (no DeepSpeed needed)."""
    from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, AutoTokenizer

    model_dir = Path(model_dir)
    spanqa_config = read_spanqa_config(model_dir)
    head = spanqa_config["head"]
    try:
        if head == "span":
            qa = _from_pretrained(AutoModelForQuestionAnswering, str(model_dir), attn_implementation)
            model = QAModel(qa.base_model, "span")
            model.head.qa_outputs.load_state_dict(qa.qa_outputs.state_dict())
        else:
            no_pooler = _no_pooler_kwargs(AutoConfig.from_pretrained(str(model_dir)))
            encoder = _from_pretrained(AutoModel, str(model_dir), attn_implementation, **no_pooler)
            model = QAModel(encoder, "crf")
            model.head.load_state_dict(load_file(str(model_dir / CRF_HEAD_FILE)))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise SpanqaError(f"{model_dir}: cannot load the exported {head} model: {_first_line(err)}") from err
    return model.eval(), tokenizer, spanqa_config


def read_spanqa_config(model_dir: str | Path) -> dict:
    """`spanqa_config.json` of an export; SpanqaError if the directory is not a spanqa export."""
    path = Path(model_dir) / SPANQA_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise SpanqaError(f"{path}: missing: {model_dir} is not a model exported by spanqa") from err
    except (OSError, json.JSONDecodeError) as err:
        raise SpanqaError(f"{path}: unreadable: {_first_line(err)}") from err
    if not isinstance(config, dict) or config.get("head") not in HEADS:
        head = config.get("head") if isinstance(config, dict) else None
        raise SpanqaError(f"{path}: head: expected one of {', '.join(HEADS)}, got {head!r}")
    return config
