"""A training run's data: its window stores (prepared from JSON or given with --prepared), the batches
each rank trains and evaluates on, and the dev file's gold answers."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from spanqa.config import TrainConfig
from spanqa.data.loader import eval_batches, make_loader, train_batches
from spanqa.data.store import WindowStore
from spanqa.errors import SpanqaError
from spanqa.io import first_line, load_tokenizer
from spanqa.train.distributed import DistEnv, on_every_rank

log = logging.getLogger("spanqa.train")


@dataclass
class TrainData:
    config: TrainConfig
    env: DistEnv
    tokenizer: Any
    train_store: WindowStore
    dev_store: WindowStore | None
    steps_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps_per_epoch = len(self.train_store) // self.config.train_batch_size
        if self.steps_per_epoch < 1:
            raise SpanqaError(
                f"--train_batch_size: {self.config.train_batch_size} is more than the "
                f"{len(self.train_store)} training windows of {self.train_store.path}: no optimizer step "
                "in an epoch"
            )

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.steps_per_epoch * self.config.gradient_accumulation_steps

    def train_loader(self, epoch: int, start: int = 0):
        """This rank's micro-batches of `epoch` from micro-step `start` (a resumed position) on."""
        config, env = self.config, self.env
        batches = train_batches(
            self.train_store.window_lengths,
            config.train_batch_size,
            config.gradient_accumulation_steps,
            env.rank,
            env.world_size,
            config.seed,
            epoch,
            start,
        )
        return make_loader(self.train_store, batches, config.num_workers, seed=config.seed + epoch)

    def eval_loader(self):
        batches = eval_batches(
            self.dev_store.window_lengths, self.config.eval_batch_size, self.env.rank, self.env.world_size
        )
        return make_loader(self.dev_store, batches, self.config.num_workers)

    @property
    def dev_metric(self) -> str:
        """The official scorer of the dev data (recorded in its store by prepare)."""
        return self.dev_store.meta["source"].get("metric", "squad-v2.0")

    @cached_property
    def golds(self) -> list:
        """The dev questions the scorer sees (read when first needed, on rank 0)."""
        return gold_questions(self.dev_store, self.config.dev_file)


def setup_data(config: TrainConfig, env: DistEnv) -> TrainData:
    tokenizer = load_tokenizer(config.model, flag="--model")
    check_model_takes(config)
    train_store, dev_store = prepare_stores(config, tokenizer, env)
    if dev_store is None:
        log.warning("no --dev_file: no evaluation, no best model")
    return TrainData(config, env, tokenizer, train_store, dev_store)


def check_model_takes(config: TrainConfig) -> None:
    """--max_seq_length must fit the encoder's position embeddings (found before any tokenizing)."""
    from spanqa.model.build import encoder_positions

    try:
        positions = encoder_positions(config.model)
    except (OSError, ValueError) as err:
        raise SpanqaError(f"--model: {config.model}: cannot read its config: {first_line(err)}") from None
    if positions is not None and config.windows.max_seq_length > positions:
        raise SpanqaError(
            f"--max_seq_length: {config.windows.max_seq_length} tokens, but {config.model} has position "
            f"embeddings for {positions}: give --max_seq_length {positions} or less"
        )


def prepare_stores(config: TrainConfig, tokenizer: Any, env: DistEnv):
    """(train store, dev store or None): --prepared DIR's, or the JSON files prepared into the cache
    (see `_prepared`); every rank then opens the finished stores read-only."""
    if config.prepared is None:
        train = _prepared(config, config.train_file, "train", tokenizer, env)
        dev = _prepared(config, config.dev_file, "dev", tokenizer, env) if config.dev_file else None
        return train, dev
    root = Path(config.prepared)
    train_store = WindowStore.open(root / "train")
    has_dev = (root / "dev" / "meta.json").is_file()
    dev_store = WindowStore.open(root / "dev", read_examples=True) if has_dev else None
    # stores made elsewhere (or long ago) must match this model's tokenizer and these window flags
    for store in (train_store, dev_store):
        if store is not None:
            store.check_compatible(tokenizer, config.windows)
    if dev_store is None and config.dev_file is not None:
        dev_store = _prepared(config, config.dev_file, "dev", tokenizer, env)
    return train_store, dev_store


def cache_dir_for(config: TrainConfig, data_file: str) -> Path:
    """One cache directory per (data file, tokenizer, window settings), so that runs never fight."""
    base = (
        Path(config.cache_dir)
        if config.cache_dir
        else Path(config.output_dir).resolve().parent / ".spanqa_cache"
    )
    key = json.dumps([str(Path(data_file).resolve()), config.model, *config.windows.as_dict().values()])
    return base / f"{Path(data_file).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _prepared(config: TrainConfig, data_file: str, role: str, tokenizer: Any, env: DistEnv) -> WindowStore:
    """The store of `data_file` in the cache: global rank 0 prepares it while every other rank waits
    (on a cache shared by the nodes it is the only writer); then a node that does not see it (a cache
    on a node's own disk) prepares its own copy on its local rank 0."""
    from spanqa.data.prepare import prepare

    out = cache_dir_for(config, data_file)

    def on_global_main() -> None:
        if env.is_main:
            log.info(f"{role}: window store {out}")
            prepare(data_file, tokenizer, out, config.windows, progress=True, out_flag="--cache_dir")

    def on_other_nodes() -> None:
        if env.is_local_main and not env.is_main and not (out / "meta.json").is_file():
            prepare(data_file, tokenizer, out, config.windows, progress=False, out_flag="--cache_dir")

    on_every_rank(on_global_main, env)  # the others wait; rank 0's error stops every rank
    on_every_rank(on_other_nodes, env)
    return WindowStore.open(out, read_examples=role == "dev")


def gold_questions(dev_store: WindowStore, dev_file: str | None) -> list:
    """The dev questions as the official scorer sees them: read untouched from the data file (the
    store's examples carry repaired answers and lack dropped questions). A store whose source file
    is not here (or has changed since) scores its own examples, with a warning."""
    from spanqa.data.prepare import file_sha256
    from spanqa.eval.squad_metric import read_gold_questions

    source = dev_store.meta["source"]
    path = Path(dev_file) if dev_file is not None else Path(source["path"])
    if path.is_file() and file_sha256(path) == source["sha256"]:
        return read_gold_questions(path)
    log.warning(
        f"{dev_store.path}: its source {source['path']} is not here (or changed): scoring the store's "
        "own examples, whose answers were validated (EM/F1 may differ from the official scorer's)"
    )
    return dev_store.examples()
