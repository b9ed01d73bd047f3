"""Where transformers 4 (>= 4.56) and 5 differ, for the model package: each difference handled here, once.

spanqa is tested on 4.57 and 5.x (see the README's install section). What differs and what spanqa does:

- The default dtype of `from_pretrained`/`from_config`: fp32 in 4.x, the checkpoint's ("auto") in 5.x.
  spanqa always asks for fp32 by `dtype=` (the name both accept since 4.56; `torch_dtype` is deprecated
  in 5): DeepSpeed wants fp32 master weights, and an export is fp32 whatever training ran in.
- SDPA attention: 5.x gives it to more encoders (ELECTRA, ERNIE, MobileBERT) than 4.57; both raise a
  ValueError naming `scaled_dot_product_attention` for one without it, and then eager attention is used.
- Progress bars: 5.x draws "Loading weights" and "Writing model shards" bars on every load and save,
  which a training log would repeat at every export; they are switched off around spanqa's own calls.
- `save_pretrained(safe_serialization=...)` is gone in 5.x; safetensors is the default in both, so spanqa
  passes nothing.
- `pipeline("question-answering")` was removed in 5.3: spanqa does not use it (`spanqa predict` answers
  questions), and `has_qa_pipeline()` tells whether this transformers still has it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

FP32 = {"dtype": torch.float32}


def major_version() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off inside the block (as they were before, after it)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def from_pretrained(auto_class: Any, name: str, attn_implementation: str, **kwargs: Any) -> nn.Module:
    """`auto_class.from_pretrained` in fp32, never remote code; SDPA falls back to eager attention for
    architectures without SDPA support."""
    load = dict(trust_remote_code=False, **FP32, **kwargs)
    with quiet_progress():
        try:
            return auto_class.from_pretrained(name, attn_implementation=attn_implementation, **load)
        except ValueError as err:
            if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(err):
                raise
            return auto_class.from_pretrained(name, attn_implementation="eager", **load)


def from_config(auto_class: Any, config: Any, **kwargs: Any) -> nn.Module:
    """A fresh fp32 model of `config` (its weights are about to be overwritten)."""
    return auto_class.from_config(config, **FP32, **kwargs)


def save_pretrained(model: Any, out_dir: str) -> None:
    """Hugging Face weights in safetensors (the default of both majors)."""
    with quiet_progress():
        model.save_pretrained(out_dir)


def no_pooler_kwargs(config: Any) -> dict[str, Any]:
    """`add_pooling_layer=False` for the encoder classes that take it (BERT, RoBERTa, ...), else nothing."""
    from transformers import AutoModel
    from transformers.models.auto.auto_factory import _get_model_class  # the same in 4.57 and 5.x

    model_class = _get_model_class(config, AutoModel._model_mapping)
    takes_it = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if takes_it else {}


def has_qa_pipeline() -> bool:
    """Whether this transformers still has `pipeline("question-answering")` (removed in 5.3)."""
    from transformers import pipelines

    return "question-answering" not in getattr(pipelines, "REMOVED_TASKS", {})
