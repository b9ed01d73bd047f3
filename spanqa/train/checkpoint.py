"""Checkpoints: their layout, a manifest that proves them whole, loading that runs no code, and the process
state DeepSpeed does not save.

OUTPUT_DIR/checkpoints/step-00000120/   DeepSpeed's files for optimizer step 120 (every rank writes its part)
    rng-rank0.pt, rng-rank1.pt, ...    each rank's RNG states, as tensors and plain numbers
    complete                           written last, by rank 0, once every rank has saved and every file is
                                       on disk: the size and CRC-32 of each file of the checkpoint

`--resume auto` takes the newest checkpoint whose files match its `complete` manifest, and says which file
made it pass over a newer one. Files are loaded with `torch.load(weights_only=True)`: a crafted checkpoint
cannot run code. DeepSpeed's optimizer files hold three of its own classes (its loss scaler, its ZeRO stage
enum and fragment addresses), which are allowed by name (`SAFE_DEEPSPEED_GLOBALS`); nothing else is.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from spanqa import io
from spanqa.errors import SpanqaError
from spanqa.train.distributed import DistEnv, barrier, on_every_rank

log = logging.getLogger("spanqa.train")
CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
PREFIX = "step-"
MANIFEST_VERSION = 1


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---- the manifest ---------------------------------------------------------------------------------


def make_manifest(path: Path) -> dict:
    """Size and CRC-32 of every file in the checkpoint directory `path` (after fsync-ing each)."""
    io.fsync_tree(path)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE):
        files[str(file.relative_to(path))] = {"bytes": file.stat().st_size, "crc32": io.file_crc32(file)}
    return {"manifest_version": MANIFEST_VERSION, "files": files}


def mark_complete(path: Path, summary: dict) -> None:
    """Write the manifest as the `complete` marker (atomically, fsync-ed, the directory too)."""
    io.write_json(path / COMPLETE, {**summary, **make_manifest(path)})
    io.fsync_tree(path)


def verify(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and every file matches its manifest, else what is
    wrong (naming the file)."""
    marker = path / COMPLETE
    if not marker.is_file():
        return f"{path}: not a complete checkpoint (no '{COMPLETE}' marker)"
    try:
        files = json.loads(marker.read_text())["files"]
        expected = {name: (int(f["bytes"]), int(f["crc32"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, OSError):
        return f"{marker}: not a checkpoint manifest (unreadable or written by another version)"
    for name, (size, crc) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, the manifest says {size}"
        if io.file_crc32(file) != crc:
            return f"{file}: its contents changed after it was saved (CRC-32 differs from the manifest)"
    return None


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root` that have a `complete` marker, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_verified(root: Path) -> Path | None:
    """The newest checkpoint that verifies (each newer one that does not is named with the reason);
    None when there is none at all. When there are checkpoints and none verifies, SpanqaError: starting
    over silently would throw away the run."""
    found = checkpoints(root)
    problems = []
    for path in reversed(found):
        problem = verify(path)
        if problem is None:
            return path
        log.warning(f"--resume auto: passing over {path.name}: {problem}")
        problems.append(problem)
    if problems:
        raise SpanqaError(
            f"--resume auto: none of the {len(found)} checkpoint(s) in {root} is intact (newest: "
            f"{problems[0]}); start over with --overwrite_output_dir, or resume from a copy you trust"
        )
    return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_verified(checkpoint_root(output_dir))
    problem = verify(Path(resume))
    if problem is not None:
        raise SpanqaError(f"--resume: {problem}")
    return Path(resume)


def check_same_head(path: Path, head: dict[str, str]) -> None:
    """A checkpoint holds one head's weights, of one shape: another --head, or another --crf_tags,
    cannot load them (`head`: the flags that shape it, as `save` records them). A checkpoint older
    than a flag's record is not checked for it."""
    saved = json.loads((path / COMPLETE).read_text())
    for flag, value in head.items():
        if saved.get(flag) is not None and saved[flag] != value:
            raise SpanqaError(
                f"--{flag} {value}: the checkpoint {path} was trained with --{flag} {saved[flag]}; resume "
                f"it with --{flag} {saved[flag]}, or train with --{flag} {value} in another --output_dir"
            )


def check_world_size(path: Path, world_size: int) -> None:
    """A checkpoint resumes on another number of ranks only when its optimizer state is whole (ZeRO stage
    0 in fp32): DeepSpeed 0.19 cannot repartition ZeRO's (or its bf16 optimizer's) per-rank state for a
    new world size, so that is refused before any step."""
    summary = json.loads((path / COMPLETE).read_text())
    saved = summary.get("world_size")
    partitioned = sorted(name for name in summary["files"] if "zero_pp_rank_" in name)
    if saved is not None and saved != world_size and partitioned:
        raise SpanqaError(
            f"--resume: {path} was written by {saved} ranks with a partitioned optimizer state "
            f"({partitioned[0]}, ...): DeepSpeed cannot spread it over {world_size}; resume on {saved} ranks"
        )


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than them."""
    complete = checkpoints(root)
    if len(complete) <= keep:
        return []
    newest_kept = complete[-keep].name
    doomed = complete[:-keep] + [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and not (p / COMPLETE).is_file() and p.name < newest_kept
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_all(root: Path) -> list[Path]:
    """Delete every checkpoint directory (complete or not) under `root`, and `root` when it is empty."""
    if not root.is_dir():
        return []
    doomed = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    if not any(root.iterdir()):
        root.rmdir()
    return doomed


# ---- RNG states, as tensors and plain numbers (loadable with weights_only=True) -----------------


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
    return safe_load(file) if file.is_file() else None


# ---- loading without running code -----------------------------------------------------------------


def safe_deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's three classes allowed; a file that needs anything
    else is refused in one line."""
    try:
        with torch.serialization.safe_globals(safe_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next(
            (line for line in str(err).splitlines() if "global" in line.lower()), io.first_line(err)
        )
        raise SpanqaError(
            f"--resume: {path}: refused to load (it needs more than tensors): {reason.strip()}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise SpanqaError(f"--resume: {path}: cannot load: {io.first_line(err)}") from None


def safe_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading through `safe_load` (every DeepSpeed load goes
    through engine.checkpoint_engine)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeTorchCheckpointEngine(engine._config)


# ---- saving and loading a whole checkpoint --------------------------------------------------------


def save(
    engine, output_dir: Path, step: int, client_state: dict, env: DistEnv, keep: int, head: dict[str, str]
) -> Path:
    """Collective: every rank saves its part; once all have, rank 0 writes the manifest as the
    `complete` marker (with `head`, the flags that shape the head's weights) and prunes all but the
    newest `keep`."""
    root, tag = checkpoint_root(output_dir), tag_for(step)

    def save_part() -> None:
        try:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
            save_rng(root / tag, env.rank)
        except (OSError, RuntimeError) as err:
            # torch.save reports a failed write as a RuntimeError without the reason ("unexpected pos")
            reason = err.strerror if isinstance(err, OSError) else f"a write failed: {io.first_line(err)}"
            raise SpanqaError(
                f"--output_dir: cannot save checkpoint {root / tag} ({reason}; is the disk full or over "
                "quota?): the partial checkpoint is removed, the previous one stays for --resume auto"
            ) from None

    try:
        on_every_rank(save_part, env)  # a barrier too: every rank's part is on disk
    except SpanqaError:
        if env.is_main:
            shutil.rmtree(root / tag, ignore_errors=True)  # never marked complete: spanqa's own, unusable
        raise
    if env.is_main:
        mark_complete(root / tag, {"step": step, "world_size": env.world_size, **head})
        prune(root, keep)
        log.info(f"checkpoint {root / tag}")
    barrier()
    return root / tag


def load(engine, path: Path, rank: int) -> dict:
    """Restore the engine and this rank's RNG streams from a verified checkpoint; its client state."""
    engine.checkpoint_engine = safe_checkpoint_engine(engine)
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None or client_state is None or "trainer" not in client_state:
        raise SpanqaError(f"--resume: {path}: DeepSpeed found no checkpoint of this run in it")
    rng = load_rng(path, rank)
    if rng is not None:
        set_rng_state(rng)
    return client_state
