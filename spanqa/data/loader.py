"""Length-bucketed, rank-sharded, resumable batches over a window store.

Sampling (the same on every rank, so data parallelism is exact):
1. a permutation of all windows that depends only on (seed, epoch);
2. cut into pools of `pool_batches` global batches, each pool sorted by window length, then cut into
   GLOBAL batches of batch_size x world_size windows of similar length;
3. the order of the global batches is shuffled (same seed), and rank r takes the slice
   [r*batch_size, (r+1)*batch_size) of each global batch.
So 1 rank with batch 8 sees, step by step, exactly the union of what 2 ranks with batch 4 see.

Remainder: when the window count is not a multiple of batch_size x world_size, the last (short)
global batch is split as evenly as possible across ranks (slice boundaries floor(r*m/W)); if it holds
fewer windows than there are ranks it is merged into the previous global batch instead. Every window
is then seen exactly once per epoch, every rank runs `len(sampler)` steps with at least one window
each, and at most one step per epoch has a batch of a different size than batch_size.

With shuffle=False the windows are taken in order of length (longest first; stable, so deterministic),
for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spanqa.data.store import WindowStore

PAD_MULTIPLE = 8  # tensor cores want sequence lengths that are multiples of 8 under fp16/bf16


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of window indices for ONE rank (the module docstring has the exact semantics).

    Remainder: the last short global batch is split as evenly as possible across the ranks, or merged
    into the previous global batch when it has fewer windows than ranks; so all ranks run `len(self)`
    steps, each with >= 1 window, and every window is used exactly once per epoch.
    Resume: `state_dict()` is {"epoch", "batches_done"}; after `load_state_dict`, iteration yields exactly
    the remaining batches of that epoch (`set_epoch` with the same epoch keeps the position).
    """

    def __init__(
        self,
        lengths: Any,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pool_batches: int = 100,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size {batch_size} and pool_batches {pool_batches} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if len(self.lengths) < world_size:
            raise ValueError(f"{len(self.lengths)} windows cannot give each of {world_size} ranks one")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.pool_batches = seed, shuffle, pool_batches
        self.epoch = 0
        self.batches_done = 0  # batches of this epoch already handed out (consumed, via make_loader)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; a no-op when it is already the current epoch (so a resumed position survives)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])

    def __len__(self) -> int:
        return len(self.global_batches())

    def __iter__(self) -> Iterator[list[int]]:
        start = self.resume_point()
        self.batches_done = start
        return self._batches_from(start)

    def resume_point(self) -> int:
        """Where the next iteration starts: mid-epoch after a partial one, else at the beginning."""
        return self.batches_done if 0 < self.batches_done < len(self) else 0

    def _batches_from(self, start: int) -> Iterator[list[int]]:
        for i, global_batch in enumerate(self.global_batches()[start:], start + 1):
            self.batches_done = i  # counted when handed out; make_loader's loader recounts on consumption
            yield self.rank_slice(global_batch).tolist()

    def rank_slice(self, global_batch: np.ndarray) -> np.ndarray:
        m, w = len(global_batch), self.world_size
        return global_batch[self.rank * m // w : (self.rank + 1) * m // w]

    def global_batches(self) -> list[np.ndarray]:
        """The global batches of the current epoch (cached per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_global_batches(self.epoch))
        return self._cache[1]

    def _make_global_batches(self, epoch: int) -> list[np.ndarray]:
        n, size = len(self.lengths), self.batch_size * self.world_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = _sort_within_pools(rng.permutation(n), self.lengths, size * self.pool_batches)
        else:
            order = np.argsort(-self.lengths, kind="stable")
        batches = [order[i : i + size] for i in range(0, n - n % size, size)]
        tail = order[n - n % size :]
        if len(tail) >= self.world_size or not batches:
            batches.append(tail)
        elif len(tail):
            batches[-1] = np.concatenate([batches[-1], tail])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


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
            self._store = WindowStore.open(self.path)
        return self._store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return self.store.window(i)


class ResumableLoader(DataLoader):
    """A DataLoader that keeps its BucketBatchSampler's position equal to the batches CONSUMED.

    Worker processes make the DataLoader draw indices ahead of the consumer; counting here, as each
    batch is handed to the caller, makes `sampler.state_dict()` right at any step.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = self.batch_sampler
        start = sampler.resume_point()
        for done, batch in enumerate(super().__iter__(), start + 1):
            sampler.batches_done = done
            yield batch


def make_loader(
    store: WindowStore,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
) -> tuple[DataLoader, BucketBatchSampler]:
    sampler = BucketBatchSampler(store.window_lengths, batch_size, rank, world_size, seed, shuffle)
    loader = ResumableLoader(
        WindowDataset(store),
        batch_sampler=sampler,
        collate_fn=collate_windows,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    return loader, sampler
