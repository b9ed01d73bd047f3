"""Everything about ranks, environment variables and process groups lives here.

Launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the deepspeed launcher,
torchrun, or slurm/train.sbatch from SLURM's variables); without them this is a single process.
spanqa creates the torch process group itself (nccl on CUDA, gloo on CPU) before DeepSpeed sees it,
so DeepSpeed only wraps it, and on CPU DeepSpeed's shared-memory all-reduce op — used only for
inference and JIT-compiled for ~75 s on first use — is switched off.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from spanqa.errors import SpanqaError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def env_from_environ() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's variables; (0, 0, 1) without a launcher."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise SpanqaError(f"RANK/LOCAL_RANK/WORLD_SIZE: not integers ({err})") from err
    if not 0 <= rank < world_size:
        raise SpanqaError(f"RANK: {rank} is not in [0, WORLD_SIZE {world_size})")
    if world_size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise SpanqaError(f"{', '.join(missing)}: required when WORLD_SIZE is {world_size}")
    return rank, local_rank, world_size


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Create the process group for this process (a world of one without a launcher)."""
    rank, local_rank, world_size = env_from_environ()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _skip_deepspeed_shm_op()
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if world_size == 1:
            # No ports, no env: a private in-memory store for a world of one.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(
                backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout, **kwargs
            )
    # DeepSpeed reads these even when the process group already exists.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return DistEnv(rank, local_rank, world_size, device)


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's TorchBackend JIT-builds its CPU shared-memory op (~75 s) whenever the op is marked
    compatible; training never uses it (gloo does the all-reduces), so mark it incompatible."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def sum_tensors(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a device tensor (no host sync by itself)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere. Pickled through a byte tensor
    so that it works the same on gloo and nccl."""
    if env.world_size == 1:
        return [obj]
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(env.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=env.device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=env.device)
    padded[: payload.numel()] = payload
    chunks = [torch.empty(longest, dtype=torch.uint8, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(chunks, padded)  # all_gather (not gather): gloo and nccl both have it for every dtype
    if not env.is_main:
        return None
    return [
        pickle.loads(chunk[: int(size.item())].cpu().numpy().tobytes())
        for chunk, size in zip(chunks, sizes, strict=True)
    ]


def broadcast_from_main(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if env.world_size == 1:
        return obj
    holder = [obj if env.is_main else None]
    dist.broadcast_object_list(holder, src=0, device=env.device)
    return holder[0]


def on_main(action, env: DistEnv):
    """Run `action` on rank 0 only and return its result on every rank; a SpanqaError it raises stops
    every rank (rank 0 reports it, the others exit quietly) instead of leaving them waiting at the next
    collective."""
    outcome = (None, None)
    if env.is_main:
        try:
            outcome = (action(), None)
        except SpanqaError as err:
            outcome = (None, str(err))
    result, message = broadcast_from_main(outcome, env)
    if message is not None:
        raise SpanqaError(message, quiet=not env.is_main)
    return result


def on_every_rank(action, env: DistEnv):
    """Run `action` on every rank and return its result; when it raises SpanqaError on any rank, every
    rank stops: rank 0 reports the lowest failing rank's message (once, not once per rank), the others
    exit quietly. For steps every rank takes (validation, saving), so that a failure on one rank never
    leaves the others waiting at the next collective."""
    try:
        outcome = (action(), None)
    except SpanqaError as err:
        outcome = (None, str(err))
    messages = gather_to_main(outcome[1], env)
    failed = None
    if env.is_main:
        failed = next(((rank, m) for rank, m in enumerate(messages) if m is not None), None)
    failed = broadcast_from_main(failed, env)
    if failed is not None:
        rank, message = failed
        where = f"rank {rank}: " if rank else ""
        raise SpanqaError(where + message, quiet=not env.is_main)
    return outcome[0]
