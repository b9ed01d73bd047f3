"""The DeepSpeed side of a run: its config (a shipped one — package data, `spanqa/ds_configs/`, which the
repository's top-level `ds_configs/` links to — or the user's, with spanqa's flags written over it) and
the engine built from it around the model, AdamW and the schedule."""

from __future__ import annotations

import json
import logging
import random
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spanqa import io
from spanqa.config import TrainConfig
from spanqa.errors import SpanqaError
from spanqa.io import read_json
from spanqa.train.distributed import DistEnv
from spanqa.train.optim import Schedule, make_optimizer

log = logging.getLogger("spanqa.train")

SHIPPED = ("cpu_fp32.json", "bf16_zero1.json", "fp16_zero1.json", "fp16_zero2.json")


def shipped_config_path(name: str) -> Path:
    """The path of a shipped config, wherever spanqa is installed (a checkout, a wheel)."""
    if name not in SHIPPED:
        raise ValueError(f"not a shipped DeepSpeed config: {name}")
    return Path(str(resources.files("spanqa") / "ds_configs" / name))


def default_config_path(device_type: str, bf16_supported: bool) -> Path:
    """bf16 ZeRO-1 on GPUs that have bf16 (Ampere and later), fp16 ZeRO-1 on older ones, fp32 on CPU."""
    if device_type == "cpu":
        return shipped_config_path("cpu_fp32.json")
    return shipped_config_path("bf16_zero1.json" if bf16_supported else "fp16_zero1.json")


def load_config(path: str | Path) -> dict:
    try:
        config = read_json(path, "DeepSpeed config")
    except SpanqaError as err:
        raise SpanqaError(f"--deepspeed_config: {err}") from None
    if not isinstance(config, dict):
        raise SpanqaError(f"--deepspeed_config: {path}: must be a JSON object")
    where = _auto_value(config)
    if where is not None:
        raise SpanqaError(
            f'--deepspeed_config: {path}: {where} is "auto", a Hugging Face Trainer feature; give a number'
        )
    return config


def _auto_value(value: Any, at: str = "$") -> str | None:
    """The JSON path of the first value "auto" (keys and other strings that contain it are fine)."""
    if value == "auto":
        return at
    if isinstance(value, dict):
        items = ((f"{at}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{at}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for path, item in items:
        found = _auto_value(item, path)
        if found is not None:
            return found
    return None


def reconcile(config: TrainConfig, ds_config: dict, world_size: int) -> tuple[dict, list[str]]:
    """The DeepSpeed config the engine gets, and notes on every value the flags overrode.

    Flags win: batch sizes, accumulation and clipping come from the TrainConfig. The optimizer and
    scheduler are always spanqa's own (torch AdamW with no decay on biases/LayerNorm, warmup + linear
    decay), so a config's `optimizer`/`scheduler` sections — which would make DeepSpeed JIT-compile
    FusedAdam on CPU — are dropped.
    """
    per_step = config.gradient_accumulation_steps * world_size
    if config.train_batch_size % per_step:
        raise SpanqaError(
            f"--train_batch_size: {config.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {config.gradient_accumulation_steps} × world size {world_size}"
        )
    wanted = {
        "train_batch_size": config.train_batch_size,
        "train_micro_batch_size_per_gpu": config.train_batch_size // per_step,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.optimizer.max_grad_norm,
    }
    resolved = dict(ds_config)
    notes = []
    for key, value in wanted.items():
        if key in resolved and resolved[key] != value:
            notes.append(
                f"deepspeed config {key}={resolved[key]} disagrees with the flags ({value}): flags win"
            )
        resolved[key] = value
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            notes.append(
                f"deepspeed config '{section}' ignored: spanqa builds AdamW and its schedule from the flags"
            )
            del resolved[section]
    resolved.setdefault("steps_per_print", 10**9)  # spanqa logs metrics itself
    return resolved, notes


def resolve_config(config: TrainConfig, env: DistEnv) -> dict:
    """--deepspeed_config (or the default for this device) with the flags written over it."""
    device = env.device
    path = config.deepspeed_config or default_config_path(
        device.type, device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    resolved, notes = reconcile(config, load_config(path), env.world_size)
    check_supported(resolved, path, device.type)
    for note in notes:
        log.info(note)
    log.info(f"world size {env.world_size} on {device.type}; deepspeed config {path}")
    return resolved


ZERO_STAGES = (0, 1, 2)  # ZeRO-3 partitions the parameters; evaluation and export read them whole


def check_supported(ds_config: dict, path: str | Path, device_type: str) -> None:
    """Refuse, naming the JSON path, what would fail inside DeepSpeed after minutes of set-up."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise SpanqaError(
            f"--deepspeed_config: {path}: zero_optimization.stage is {json.dumps(stage)}; spanqa trains "
            f"with ZeRO stage 0, 1 or 2 (stage 3 would partition the parameters it evaluates and exports)"
        )
    if device_type == "cpu" and ds_config.get("fp16", {}).get("enabled") is True:
        raise SpanqaError(
            f"--deepspeed_config: {path}: fp16.enabled is true, but there is no CUDA device: fp16 "
            "training needs a GPU (on CPU give no --deepspeed_config: spanqa uses fp32)"
        )


def build_engine(config: TrainConfig, ds_config: dict, schedule: Schedule, env: DistEnv):
    """(DeepSpeed engine, LR scheduler) around a fresh model: the pretrained encoder and a new head."""
    import deepspeed

    from spanqa.model.build import build_model

    # The same seed on every rank, right before the head is built: its initialisation depends on
    # nothing that ran before (DeepSpeed also broadcasts rank 0's parameters)
    seed_everything(config.seed)
    try:
        model = build_model(config.model, config.head, crf_tags=config.crf_tags)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SpanqaError(f"--model {config.model}: cannot load the encoder: {io.first_line(err)}") from err
    if config.compile:
        model.compile()  # in place: parameter names (checkpoints, export) stay the same
    optimizer = make_optimizer(model, config.optimizer, env.device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule.lr_scheduler(optimizer),
        config=dict(ds_config),
        dist_init_required=False,
    )
    # From here on each rank draws its own dropout masks (identical masks on every rank would
    # correlate the replicas' noise); a resumed run restores these streams per rank.
    seed_everything(config.seed + env.rank)
    return engine, scheduler


def clips_without_norm(engine) -> bool:
    """DeepSpeed's plain fp32 path (no fp16/bf16, no ZeRO) clips without keeping the gradient norm."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def compute_dtype(engine) -> str:
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
