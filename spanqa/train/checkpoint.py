"""Checkpoint layout, the `complete` marker, and the process state that DeepSpeed does not save.

OUTPUT_DIR/checkpoints/step-00000120/   DeepSpeed's files for optimizer step 120 (every rank writes its part)
    rng-rank0.pt, rng-rank1.pt, ...    each rank's RNG states (python, numpy, torch, cuda)
    complete                           written by rank 0 after every rank finished saving

A directory without `complete` (a save that was interrupted) is never taken by `--resume auto`.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from spanqa import io
from spanqa.errors import SpanqaError
from spanqa.train.distributed import DistEnv, barrier

log = logging.getLogger("spanqa.train")
CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_complete(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(checkpoint_root(output_dir))
    path = Path(resume)
    if not is_complete(path):
        raise SpanqaError(f"--resume: {path}: not a complete checkpoint (no '{COMPLETE}' marker)")
    return path


def mark_complete(path: Path, info: dict) -> None:
    """Atomically write the marker (with a small summary, for people) once all ranks saved."""
    io.write_json(path / COMPLETE, info)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than them."""
    complete = complete_checkpoints(root)
    if len(complete) <= keep:
        return []
    newest_kept = complete[-keep].name
    doomed = complete[:-keep] + [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and not is_complete(p) and p.name < newest_kept
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng-rank{rank}.pt"


def save_rng(path: Path, rank: int) -> None:
    with io.atomic_file(rng_file(path, rank), binary=True) as f:
        torch.save(rng_state(), f)


def load_rng(path: Path, rank: int) -> dict | None:
    """This rank's saved RNG states; None when the run had fewer ranks (then the seed's stream goes on)."""
    file = rng_file(path, rank)
    return torch.load(file, weights_only=False) if file.is_file() else None


def save(engine, output_dir: Path, step: int, client_state: dict, env: DistEnv, keep: int) -> Path:
    """Collective: every rank saves its part; rank 0 marks the checkpoint complete afterwards and prunes
    all but the newest `keep`."""
    root, tag = checkpoint_root(output_dir), tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    save_rng(root / tag, env.rank)
    barrier()
    if env.is_main:
        mark_complete(root / tag, {"step": step, "world_size": env.world_size})
        prune(root, keep)
        log.info(f"checkpoint {root / tag}")
    barrier()
    return root / tag


def load(engine, path: Path, rank: int) -> dict:
    """Restore the engine and this rank's RNG streams from a complete checkpoint; its client state."""
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise SpanqaError(f"--resume: {path}: DeepSpeed could not load it")
    rng = load_rng(path, rank)
    if rng is not None:
        set_rng_state(rng)
    return client_state
