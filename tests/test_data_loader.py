"""The bucketed distributed sampler, collate and loader (spanqa.data.loader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spanqa.data.loader import (
    PAD_MULTIPLE,
    collate_windows,
    eval_batches,
    global_batches,
    make_loader,
    train_batches,
)


def random_lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 384, size=n)


def epoch_batches(lengths, batch_size, world_size, accumulation=1, seed=0, epoch=0) -> list[list[list[int]]]:
    """batches[rank][micro-step] for every rank of one epoch; `batch_size` is the global batch."""
    return [
        train_batches(lengths, batch_size, accumulation, rank, world_size, seed, epoch)
        for rank in range(world_size)
    ]


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("n", [1000, 1001, 1003, 37])  # 1001 and 1003 leave remainders
def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder(world_size, accumulation, n):
    batch_size = 12
    per_rank = epoch_batches(random_lengths(n), batch_size, world_size, accumulation)
    assert len({len(batches) for batches in per_rank}) == 1, "every rank runs the same number of steps"
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == n - n % batch_size, "every window at most once per epoch"
    sizes = {len(batch) for batches in per_rank for batch in batches}
    assert sizes == {batch_size // (world_size * accumulation)}, "every micro-batch has the same size"


def test_the_remainder_sits_out_a_different_epoch_each_time():
    lengths = random_lengths(1003)
    out = [set(range(1003)) - {i for b in global_batches(lengths, 8, 3, e) for i in b} for e in (0, 1)]
    assert len(out[0]) == len(out[1]) == 1003 % 8 and out[0] != out[1]


def test_order_depends_only_on_seed_and_epoch():
    lengths = random_lengths(500)
    a = epoch_batches(lengths, 8, 2, seed=1, epoch=3)
    assert a == epoch_batches(lengths, 8, 2, seed=1, epoch=3)
    assert a != epoch_batches(lengths, 8, 2, seed=1, epoch=4)
    assert a != epoch_batches(lengths, 8, 2, seed=2, epoch=3)


@pytest.mark.parametrize("n", [1000, 1003])
def test_every_split_of_a_global_batch_sees_the_same_windows_per_step(n):
    """1 rank x batch 8, 2 ranks x 4, 1 rank x accumulation 2 x 4, 2 ranks x 2 x 2: same steps."""
    lengths = random_lengths(n)
    (single,) = epoch_batches(lengths, 8, 1, seed=5, epoch=2)
    for world_size, accumulation in ((2, 1), (1, 2), (2, 2)):
        per_rank = epoch_batches(lengths, 8, world_size, accumulation, seed=5, epoch=2)
        for step, batch in enumerate(single):
            micro = [
                per_rank[r][step * accumulation + m] for m in range(accumulation) for r in range(world_size)
            ]
            assert sorted(batch) == sorted(i for b in micro for i in b), (world_size, accumulation, step)


def test_batches_group_similar_lengths():
    lengths = random_lengths(20_000)
    (batches,) = epoch_batches(lengths, 32, 1)
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    # uniform lengths 20..384: padding to the batch maximum of random batches would waste ~45%
    assert real / computed > 0.95


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_cover_every_window_once_longest_first(world_size):
    lengths = random_lengths(101)
    per_rank = [eval_batches(lengths, 10, rank, world_size) for rank in range(world_size)]
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(101))
    (batches,) = [eval_batches(lengths, 10)]
    flat = [i for b in batches for i in b]
    assert list(lengths[flat]) == sorted(lengths, reverse=True) and eval_batches(lengths, 10) == batches


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(world_size):
    lengths = random_lengths(1001)
    for rank in range(world_size):
        full = train_batches(lengths, 24, 2, rank, world_size, seed=3, epoch=2)
        tail = train_batches(lengths, 24, 2, rank, world_size, seed=3, epoch=2, start=17)
        assert full[:17] + tail == full


def test_collate_pads_to_a_multiple_of_8(tiny_store):
    windows = [tiny_store.window(i) for i in (0, 1, 5)]
    batch = collate_windows(windows)
    longest = max(len(w["input_ids"]) for w in windows)
    b, width = batch["input_ids"].shape
    assert b == 3 and width % PAD_MULTIPLE == 0 and longest <= width < longest + PAD_MULTIPLE
    for key in ("input_ids", "attention_mask", "token_type_ids", "start_positions", "window_index"):
        assert batch[key].dtype == torch.long, key
    assert batch["context_mask"].dtype == torch.bool
    for row, w in enumerate(windows):
        n = len(w["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == w["input_ids"].tolist()
        assert batch["input_ids"][row, n:].eq(0).all() and batch["attention_mask"][row].sum() == n
        assert batch["token_type_ids"][row, :n].tolist() == w["token_type_ids"].tolist()
        context = batch["context_mask"][row].nonzero().flatten().tolist()
        assert context == list(range(w["context_start"], w["context_end"] + 1))
        assert batch["start_positions"][row] == w["start_position"]
        assert batch["end_positions"][row] == w["end_position"]
        assert batch["window_index"][row] == w["index"]


def loader_epoch(store, num_workers, world_size=1) -> list[list[list[int]]]:
    out = []
    for rank in range(world_size):
        batches = eval_batches(store.window_lengths, 4, rank, world_size)
        loader = make_loader(store, batches, num_workers=num_workers)
        out.append([batch["window_index"].tolist() for batch in loader])
        assert out[-1] == batches
    return out


def test_loader_covers_the_store_once(tiny_store):
    per_rank = loader_epoch(tiny_store, num_workers=0, world_size=2)
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(len(tiny_store)))


def test_loader_with_worker_processes(tiny_store):
    assert loader_epoch(tiny_store, num_workers=2) == loader_epoch(tiny_store, num_workers=0)


def test_iterating_a_loader_draws_nothing_from_the_global_rng(tiny_store):
    """Workers get their seeds from the loader's own generator, so that a resumed run (or one that
    evaluates more often) sees the same dropout masks as an uninterrupted one."""
    batches = train_batches(tiny_store.window_lengths, 8, 1, 0, 1, seed=1, epoch=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for workers in (0, 2):
        list(make_loader(tiny_store, batches, num_workers=workers))
    assert torch.equal(torch.rand(3), expected)


def test_dataset_pickles_as_a_path_and_reopens(tiny_store):
    """Spawned workers get the dataset pickled: it must not carry the memmapped arrays along."""
    import pickle

    from spanqa.data.loader import WindowDataset

    dataset = WindowDataset(tiny_store)
    blob = pickle.dumps(dataset)
    assert len(blob) < 1000 < tiny_store.input_ids.nbytes
    clone = pickle.loads(blob)
    assert len(clone) == len(dataset)
    for i in (0, len(dataset) - 1):
        a, b = clone[i], dataset[i]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
