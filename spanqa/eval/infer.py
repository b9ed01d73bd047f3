"""Run a model over a loader of windows and keep each window's answer candidates: the one inference loop
that training's evaluation and `spanqa predict` share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spanqa.eval.candidates import WindowCandidates, head_candidates

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "context_mask")
LABELS = ("start_positions", "end_positions")


@dataclass
class Inferred:
    candidates: WindowCandidates  # one row per window, in loader order
    window_indices: np.ndarray  # int64: the store index of each row
    loss_sum: float  # sum over windows of the loss (0.0 without labels)


def infer_candidates(
    forward: Callable[..., dict],
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    n_best: int,
    max_answer_length: int,
    with_loss: bool = False,
    progress: Any = None,
) -> Inferred:
    """Candidates of every window in `batches` (collated by spanqa.data.loader).

    `forward` runs the batch (the QAModel itself, or the DeepSpeed engine that wraps it); `model` is
    the QAModel, whose head decides how outputs become candidates. With `with_loss` the labels go in
    too and the window-weighted loss is summed. `progress`: a bar (spanqa.progress) to advance by windows.
    """
    parts, indices = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    names = MODEL_INPUTS + (LABELS if with_loss else ())
    with torch.no_grad():
        for batch in batches:
            inputs = {name: batch[name].to(device, non_blocking=True) for name in names}
            outputs = forward(**inputs)
            if with_loss:
                loss_sum += outputs["loss"].double() * len(batch["input_ids"])
            parts.append(head_candidates(model, outputs, inputs["context_mask"], n_best, max_answer_length))
            indices.append(batch["window_index"].numpy())
            if progress is not None:
                progress.update(len(batch["input_ids"]))
    if not parts:
        empty = WindowCandidates(
            np.zeros((0, n_best), np.float32), np.zeros((0, n_best), np.int32),
            np.zeros((0, n_best), np.int32), np.zeros(0, np.float32),
        )  # fmt: skip
        return Inferred(empty, np.zeros(0, np.int64), 0.0)
    return Inferred(WindowCandidates.concatenate(parts), np.concatenate(indices), float(loss_sum))
