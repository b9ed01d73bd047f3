"""A trained model as a directory anyone can load: Hugging Face weights, the tokenizer, and spanqa's settings.

    OUT/best_model/   config.json, model.safetensors (+ crf_head.safetensors), tokenizer files,
                      spanqa_config.json: {"format_version", "head", "windows", "answers", ...}

`windows` (WindowSettings) and `answers` (AnswerSettings) are the very settings objects training used;
`spanqa predict` reads them back, so a model answers new questions through the windows it was trained on
and with its own null threshold. The span head's directory is a plain `AutoModelForQuestionAnswering`
checkpoint as well.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spanqa import io
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.eval.postprocess import AnswerSettings
from spanqa.model import HEAD_NAMES

SPANQA_CONFIG = "spanqa_config.json"
EVAL_DIR = "eval"  # the scores, predictions and null odds of the evaluation that chose the model
FORMAT_VERSION = 2


@dataclass(frozen=True)
class ExportInfo:
    """What spanqa_config.json says about an exported model."""

    head: str
    windows: WindowSettings = field(default_factory=WindowSettings)
    answers: AnswerSettings = field(default_factory=AnswerSettings)
    base_model: str | None = None  # the encoder training started from
    step: int | None = None  # the optimizer step the weights are from
    metric: dict[str, Any] | None = None  # {"name": "best_f1", "value": 51.7, "threshold": -2.1}

    def as_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "head": self.head,
            "windows": self.windows.as_dict(),
            "answers": self.answers.as_dict(),
            "base_model": self.base_model,
            "step": self.step,
            "metric": self.metric,
        }


def export_model(
    model: Any, tokenizer: Any, out_dir: str | Path, info: ExportInfo, evaluation: Path | None = None
) -> Path:
    """Write `model` + `tokenizer` + spanqa_config.json to `out_dir`, atomically: an existing export
    is replaced only once the new one is complete. `evaluation`: a directory of eval files (the
    evaluation that chose this model) to keep with it, as OUT/eval/."""
    from spanqa.model.build import save_pretrained

    if info.head != model.head_name:
        raise ValueError(f"export says head {info.head!r} but the model has {model.head_name!r}")
    with io.atomic_dir(out_dir) as tmp:
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        io.write_json(tmp / SPANQA_CONFIG, info.as_json())
        if evaluation is not None:
            shutil.copytree(evaluation, tmp / EVAL_DIR)
    return Path(out_dir)


def read_export_info(model_dir: str | Path) -> ExportInfo:
    """spanqa_config.json of an export; SpanqaError naming the file and field when it is not one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SpanqaError(f"--model: {model_dir}: no such directory")
    path = model_dir / SPANQA_CONFIG
    if not path.is_file():
        raise SpanqaError(f"{path}: missing: {model_dir} is not a model exported by spanqa")
    data = io.read_json(path, "spanqa config")
    if not isinstance(data, dict):
        raise SpanqaError(f"{path}: $: expected a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise SpanqaError(
            f"{path}: format_version {data.get('format_version')!r}; this spanqa reads version "
            f"{FORMAT_VERSION} (export the model again with this version)"
        )
    if data.get("head") not in HEAD_NAMES:
        raise SpanqaError(f"{path}: head: expected one of {', '.join(HEAD_NAMES)}, got {data.get('head')!r}")
    return ExportInfo(
        head=data["head"],
        windows=_settings(WindowSettings, data, "windows", path),
        answers=_settings(AnswerSettings, data, "answers", path),
        base_model=data.get("base_model"),
        step=data.get("step"),
        metric=data.get("metric"),
    )


def _settings(cls: type, data: dict, key: str, path: Path):
    values = data.get(key)
    if not isinstance(values, dict):
        raise SpanqaError(f"{path}: {key}: expected an object")
    try:
        return cls(**values)
    except TypeError as err:
        raise SpanqaError(f"{path}: {key}: {io.first_line(err)}") from None
    except SpanqaError as err:
        raise SpanqaError(f"{path}: {key}: {err}") from None


def load_export(model_dir: str | Path, attn_implementation: str = "sdpa") -> tuple[Any, Any, ExportInfo]:
    """The exported model (eval mode, no DeepSpeed needed), its tokenizer and its ExportInfo."""
    from safetensors import SafetensorError

    from spanqa.model.build import from_pretrained

    info = read_export_info(model_dir)
    try:
        model = from_pretrained(model_dir, info.head, attn_implementation)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise SpanqaError(
            f"{model_dir}: cannot load the exported {info.head} model: {io.first_line(err)}"
        ) from err
    tokenizer = io.load_tokenizer(model_dir, flag="--model")
    return model, tokenizer, info
