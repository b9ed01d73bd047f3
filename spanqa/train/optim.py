"""The optimizer, its learning-rate schedule, and the plan of a run in optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spanqa.config import OptimizerSettings, TrainConfig


def is_decayed(name: str, param: torch.nn.Parameter) -> bool:
    """BERT's rule: no weight decay on biases and LayerNorm weights."""
    lowered = name.lower()
    return not (name.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered)


def is_head(name: str) -> bool:
    """Whether a parameter belongs to the answer head (QAModel.head) rather than the encoder."""
    return name.startswith("head.")


def make_optimizer(
    model: torch.nn.Module, settings: OptimizerSettings, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over four groups: encoder and head (`head.*`, at --head_lr_multiplier times the rate),
    each with and without weight decay; the encoder's decayed group first (the one whose rate is logged)."""
    if settings.head_lr_multiplier is None:  # TrainConfig resolves it from the head
        raise ValueError("make_optimizer: head_lr_multiplier is not resolved (TrainConfig does it per head)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for in_head, multiplier in ((False, 1.0), (True, settings.head_lr_multiplier)):
        for decayed, decay in ((True, settings.weight_decay), (False, 0.0)):
            params = [p for n, p in named if is_head(n) == in_head and is_decayed(n, p) == decayed]
            if params:
                groups.append(
                    {"params": params, "weight_decay": decay, "lr": settings.learning_rate * multiplier}
                )
    # fused=True runs one CUDA kernel for all parameters; torch's AdamW also means DeepSpeed builds
    # no FusedAdam of its own (which it would JIT-compile on CPU).
    return torch.optim.AdamW(
        groups, lr=settings.learning_rate, eps=settings.adam_epsilon, fused=device.type == "cuda"
    )


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 → 1 over warmup_steps, then linearly down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@dataclass(frozen=True)
class Schedule:
    """A run in optimizer steps: the schedule spans total_steps; training stops at stop_step."""

    steps_per_epoch: int
    total_steps: int
    stop_step: int
    warmup_steps: int
    eval_at: frozenset[int]

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(self.warmup_steps, self.total_steps)
        )


def plan(config: TrainConfig, steps_per_epoch: int, evaluates: bool) -> Schedule:
    total = max(1, round(config.num_train_epochs * steps_per_epoch))
    stop = min(total, config.max_steps) if config.max_steps else total
    at = eval_points(steps_per_epoch, total, config.eval_per_epoch, config.eval_steps) if evaluates else set()
    return Schedule(steps_per_epoch, total, stop, config.optimizer.warmup_for(total), frozenset(at))


def eval_points(steps_per_epoch: int, total_steps: int, eval_per_epoch: int, eval_steps: int) -> set[int]:
    """Optimizer steps after which to evaluate: evenly spaced per epoch, every eval_steps, and the last."""
    points = {total_steps}
    for epoch in range(math.ceil(total_steps / steps_per_epoch) if eval_per_epoch else 0):
        points.update(
            epoch * steps_per_epoch + steps_per_epoch * j // eval_per_epoch
            for j in range(1, eval_per_epoch + 1)
        )
    if eval_steps:
        points.update(range(eval_steps, total_steps + 1, eval_steps))
    return {p for p in points if 0 < p <= total_steps}
