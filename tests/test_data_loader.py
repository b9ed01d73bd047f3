"""The bucketed distributed sampler, collate and loader (spanqa.data.loader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spanqa.data.loader import PAD_MULTIPLE, BucketBatchSampler, collate_windows, make_loader


def random_lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 384, size=n)


def epoch_batches(lengths, batch_size, world_size, seed=0, epoch=0, shuffle=True) -> list[list[list[int]]]:
    """batches[rank][step] for every rank of one epoch."""
    out = []
    for rank in range(world_size):
        sampler = BucketBatchSampler(lengths, batch_size, rank, world_size, seed=seed, shuffle=shuffle)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [1000, 1001, 1003, 37])  # 1001 and 1003 leave remainders; 37 < one batch x3
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_and_complete(world_size, n, shuffle):
    batch_size = 8
    per_rank = epoch_batches(random_lengths(n), batch_size, world_size, shuffle=shuffle)
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, "every rank runs the same number of steps"
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == list(range(n)), "every window exactly once per epoch"
    sizes = [len(batch) for batches in per_rank for batch in batches]
    assert min(sizes) >= 1
    # at most one step per epoch has batches of another size than batch_size
    odd_steps = {s for batches in per_rank for s, b in enumerate(batches) if len(b) != batch_size}
    assert len(odd_steps) <= 1
    for s in odd_steps:  # the short/merged global batch is split as evenly as possible
        step_sizes = [len(batches[s]) for batches in per_rank]
        assert max(step_sizes) - min(step_sizes) <= 1


def test_remainder_smaller_than_the_world_is_merged():
    # 16 windows = 2 global batches of 2x4, plus 1 left: fewer than 2 ranks, so merged into a batch
    per_rank = epoch_batches(random_lengths(17), 4, 2)
    assert [len(b) for b in per_rank[0]] + [len(b) for b in per_rank[1]] in (
        [4, 5, 4, 4],
        [5, 4, 4, 4],
        [4, 4, 4, 5],
        [4, 4, 5, 4],
    )
    assert len(per_rank[0]) == 2


def test_order_depends_only_on_seed_and_epoch():
    lengths = random_lengths(500)
    a = epoch_batches(lengths, 8, 2, seed=1, epoch=3)
    assert a == epoch_batches(lengths, 8, 2, seed=1, epoch=3)
    assert a != epoch_batches(lengths, 8, 2, seed=1, epoch=4)
    assert a != epoch_batches(lengths, 8, 2, seed=2, epoch=3)


def test_set_epoch_changes_the_order_of_one_sampler():
    sampler = BucketBatchSampler(random_lengths(300), 8)
    first = list(sampler)
    assert list(sampler) == first  # a full pass then another of the same epoch: the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.parametrize("n", [1000, 1003])
def test_one_rank_of_8_equals_two_ranks_of_4_step_by_step(n):
    lengths = random_lengths(n)
    (single,) = epoch_batches(lengths, 8, 1, seed=5, epoch=2)
    rank0, rank1 = epoch_batches(lengths, 4, 2, seed=5, epoch=2)
    assert len(single) == len(rank0) == len(rank1)
    for step, batch in enumerate(single):
        assert batch == rank0[step] + rank1[step]


def test_batches_group_similar_lengths():
    lengths = random_lengths(20_000)
    (batches,) = epoch_batches(lengths, 32, 1)
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    # uniform lengths 20..384: padding to the batch maximum of random batches would waste ~45%
    assert real / computed > 0.95


def test_eval_order_is_by_length_and_deterministic():
    lengths = random_lengths(100)
    (batches,) = epoch_batches(lengths, 10, 1, shuffle=False)
    flat = [i for b in batches for i in b]
    assert list(lengths[flat]) == sorted(lengths, reverse=True)
    assert epoch_batches(lengths, 10, 1, shuffle=False, epoch=7) == [batches]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(world_size):
    lengths = random_lengths(1001)
    for rank in range(world_size):
        sampler = BucketBatchSampler(lengths, 8, rank, world_size, seed=3)
        sampler.set_epoch(2)
        full = list(sampler)
        # another sampler consumes 17 batches of epoch 2, then its state is restored in a fresh one
        partial = BucketBatchSampler(lengths, 8, rank, world_size, seed=3)
        partial.set_epoch(2)
        it = iter(partial)
        head = [next(it) for _ in range(17)]
        state = partial.state_dict()
        assert state == {"epoch": 2, "batches_done": 17}
        resumed = BucketBatchSampler(lengths, 8, rank, world_size, seed=3)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # what a trainer calls at the top of the epoch loop: must keep the position
        tail = list(resumed)
        assert head + tail == full
        assert len(resumed) == len(full)


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


def loader_epoch(store, num_workers, world_size=1, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(world_size):
        loader, sampler = make_loader(store, 4, rank, world_size, seed=1, num_workers=num_workers, **kwargs)
        out.append([batch["window_index"].tolist() for batch in loader])
        assert sampler.state_dict() == {"epoch": 0, "batches_done": len(sampler)}
    return out


def test_loader_covers_the_store_once_per_epoch(tiny_store):
    per_rank = loader_epoch(tiny_store, num_workers=0, world_size=2)
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(len(tiny_store)))


def test_loader_with_worker_processes(tiny_store):
    assert loader_epoch(tiny_store, num_workers=2) == loader_epoch(tiny_store, num_workers=0)


def test_loader_state_counts_consumed_batches_with_workers(tiny_store):
    """Workers prefetch ahead; the saved position must be what the caller consumed."""
    loader, sampler = make_loader(tiny_store, 4, seed=1, num_workers=2)
    full = [b["window_index"].tolist() for b in loader]
    loader, sampler = make_loader(tiny_store, 4, seed=1, num_workers=2)
    it = iter(loader)
    head = [next(it)["window_index"].tolist() for _ in range(5)]
    state = sampler.state_dict()
    del it
    assert state == {"epoch": 0, "batches_done": 5}
    loader, sampler = make_loader(tiny_store, 4, seed=1, num_workers=2)
    sampler.load_state_dict(state)
    assert head + [b["window_index"].tolist() for b in loader] == full


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
