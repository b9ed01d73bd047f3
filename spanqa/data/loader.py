"""Length-bucketed, rank-sharded, resumable batches over a window store.

Training (`train_batches`): the order of optimizer steps depends only on the seed, the epoch and
--train_batch_size, never on how many ranks share the work:
1. a permutation of all windows that depends only on (seed, epoch);
2. cut into pools of `pool_batches` global batches, each pool sorted by window length, then cut into
   GLOBAL batches of exactly train_batch_size windows of similar length (the windows left over at the
   end of an epoch, fewer than one global batch, sit that epoch out: a different few each epoch);
3. the order of the global batches is shuffled (same seed);
4. each global batch is one optimizer step, cut into accumulation x world micro-batches: micro-step m
   of rank r takes slice m * world + r.
So 2 ranks x accumulation 1, 1 rank x accumulation 2 and 1 rank with the whole batch all see the same
windows at every optimizer step. A position (epoch, micro-step) is all a resumed run needs.

Evaluation (`eval_batches`): every window exactly once, longest first, rank r taking every world-th
window; ranks may run different numbers of batches (evaluation has no collective per batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spanqa.data.store import WindowStore

PAD_MULTIPLE = 8  # tensor cores want sequence lengths that are multiples of 8 under fp16/bf16


def global_batches(
    lengths: Any, batch_size: int, seed: int, epoch: int, pool_batches: int = 100
) -> list[np.ndarray]:
    """The global batches of one epoch, in step order, each exactly `batch_size` window indices."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1 or pool_batches < 1:
        raise ValueError(f"batch_size {batch_size} and pool_batches {pool_batches} must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    order = _sort_within_pools(rng.permutation(len(lengths)), lengths, batch_size * pool_batches)
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def split_global_batch(batch: np.ndarray, accumulation: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's `accumulation` micro-batches of one global batch (micro-step m: slice m*world+rank)."""
    slots = accumulation * world_size
    if len(batch) % slots:
        raise ValueError(f"a global batch of {len(batch)} does not split into {slots} micro-batches")
    micro = len(batch) // slots
    return [
        batch[(m * world_size + rank) * micro : (m * world_size + rank + 1) * micro]
        for m in range(accumulation)
    ]


def train_batches(
    lengths: Any,
    train_batch_size: int,
    accumulation: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
) -> list[list[int]]:
    """This rank's micro-batches of `epoch` from micro-step `start` on (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    out = []
    for batch in global_batches(lengths, train_batch_size, seed, epoch):
        out += [micro.tolist() for micro in split_global_batch(batch, accumulation, world_size, rank)]
    return out[start:]


def eval_batches(lengths: Any, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Batches of this rank's share of the windows, longest first (stable, so deterministic)."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size {batch_size} must be >= 1 and rank {rank} in [0, {world_size})")
    mine = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")[rank::world_size]
    return [mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size)]


def _sort_within_pools(order: np.ndarray, lengths: np.ndarray, pool: int) -> np.ndarray:
    pieces = []
    for i in range(0, len(order), pool):
        chunk = order[i : i + pool]
        pieces.append(chunk[np.argsort(lengths[chunk], kind="stable")])
    return np.concatenate(pieces) if pieces else order


def collate_windows(windows: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of `WindowStore.window` dicts to the longest one, rounded up to a multiple of 8."""
    b = len(windows)
    lengths = np.fromiter((len(w["input_ids"]) for w in windows), np.int64, b)
    width = -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = np.zeros((b, width), np.int64)
    token_type_ids = np.zeros((b, width), np.int64)
    for row, (w, n) in enumerate(zip(windows, lengths, strict=True)):
        input_ids[row, :n] = w["input_ids"]
        token_type_ids[row, :n] = w["token_type_ids"]
    labels = np.array(
        [
            (w["context_start"], w["context_end"], w["start_position"], w["end_position"], w["index"])
            for w in windows
        ],
        dtype=np.int64,
    )
    position = np.arange(width)
    context_mask = (position >= labels[:, 0:1]) & (position <= labels[:, 1:2])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy((position < lengths[:, None]).astype(np.int64)),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "context_mask": torch.from_numpy(context_mask),
        "start_positions": torch.from_numpy(labels[:, 2].copy()),
        "end_positions": torch.from_numpy(labels[:, 3].copy()),
        "window_index": torch.from_numpy(labels[:, 4].copy()),
    }


class WindowDataset(Dataset):
    """Windows of a store by index. Pickles as the store's path: each worker maps the files itself
    (pickling the memmaps would copy the whole store into every worker)."""

    def __init__(self, store: WindowStore):
        self.path = store.path
        self._store: WindowStore | None = store
        self._len = len(store)

    @property
    def store(self) -> WindowStore:
        if self._store is None:
            self._store = WindowStore.open(self.path, verify=False)  # the parent process verified it
        return self._store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return self.store.window(i)


def make_loader(
    store: WindowStore, batches: list[list[int]], num_workers: int = 0, seed: int = 0
) -> DataLoader:
    """A DataLoader over the given batches of window indices, collated by `collate_windows`.

    Its worker seeds come from a private generator: iterating must not draw from the global torch
    RNG, or a resumed run (or one that evaluates more often) would see other dropout masks.
    """
    return DataLoader(
        WindowDataset(store),
        batch_sampler=batches,
        collate_fn=collate_windows,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
