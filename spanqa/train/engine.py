"""The Trainer: DeepSpeed engine over an encoder + answer head, length-bucketed batches, eval, checkpoints.

    trainer = Trainer(config, env)      # data, model, AdamW + schedule, DeepSpeed, tracker, resume
    trainer.train()                     # train_step() per micro-batch, validate() + save() at eval points
    trainer.close()

Fast path (each on by default where it helps): SDPA attention (build_model), fused torch AdamW on
CUDA, batches padded only to their longest window rounded up to 8, pinned host memory with
non-blocking copies, no host sync per step (losses stay on the device and are read, reduced over
ranks and logged every --logging_steps), `--compile` for torch.compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from spanqa.config import (
    TrainConfig,
    default_deepspeed_config_path,
    load_deepspeed_config,
    reconcile_deepspeed_config,
)
from spanqa.errors import SpanqaError
from spanqa.train import checkpoint as ckpt
from spanqa.train.distributed import (
    DistEnv,
    PreemptionFlag,
    barrier,
    broadcast_from_main,
    gather_to_main,
    requeue_slurm_job,
    slurm_job_to_requeue,
    sum_tensors,
)

log = logging.getLogger("spanqa.train")
PREEMPTION_CHECK_STEPS = 10  # ranks agree on a received signal at least this often (one tiny all-reduce)
KEEP_CHECKPOINTS = 2
TRAIN_LOG = "train_log.jsonl"
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "mlflow", "numpy", "spanqa")


def setup_logging(rank: int) -> None:
    """Log lines prefixed with the rank; rank 0 says what happens, the others only warn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# ---- data ---------------------------------------------------------------------------------------


def prepare_stores(config: TrainConfig, tokenizer, env: DistEnv):
    """(train store, dev store or None): --prepared DIR's, or the JSON files prepared into the cache.

    Local rank 0 of each node prepares (the cache is per node), the others wait at a barrier and
    then open the finished stores read-only.
    """
    from spanqa.data.prepare import prepare
    from spanqa.data.store import WindowStore
    from spanqa.data.windows import WindowSettings

    if config.prepared is not None:
        root = Path(config.prepared)
        train_store = WindowStore.open(root / "train")
        dev = root / "dev"
        dev_store = WindowStore.open(dev) if (dev / "meta.json").is_file() else None
        # stores made elsewhere (or long ago) must match this model's tokenizer and these window flags
        settings = WindowSettings(config.max_seq_length, config.doc_stride, config.max_query_length)
        for store in (train_store, dev_store):
            if store is not None:
                store.check_compatible(tokenizer, settings.as_dict())
        if dev_store is None and config.dev_file is not None:
            dev_store = _prepared(config, config.dev_file, "dev", tokenizer, env, prepare, WindowStore)
        return train_store, dev_store
    train = _prepared(config, config.train_file, "train", tokenizer, env, prepare, WindowStore)
    dev = None
    if config.dev_file is not None:
        dev = _prepared(config, config.dev_file, "dev", tokenizer, env, prepare, WindowStore)
    return train, dev


def cache_dir_for(config: TrainConfig, data_file: str) -> Path:
    """One cache directory per (data file, tokenizer, window settings), so that runs never fight."""
    base = (
        Path(config.cache_dir)
        if config.cache_dir
        else Path(config.output_dir).resolve().parent / ".spanqa_cache"
    )
    key = json.dumps(
        [
            str(Path(data_file).resolve()),
            config.model,
            config.max_seq_length,
            config.doc_stride,
            config.max_query_length,
        ]
    )
    return base / f"{Path(data_file).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _prepared(config, data_file, role, tokenizer, env, prepare, store_class):
    out = cache_dir_for(config, data_file)
    if env.is_local_main:
        log.info(f"{role}: window store {out}")
        prepare(
            data_file,
            tokenizer,
            out,
            config.max_seq_length,
            config.doc_stride,
            config.max_query_length,
            progress=env.is_main,
        )
    barrier()
    return store_class.open(out)


def gold_questions(dev_store, dev_file: str | None) -> list:
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


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpanqaError(f"--model: {model}: cannot load its tokenizer: {first_line}") from err


# ---- optimizer and schedule ---------------------------------------------------------------------


def is_decayed(name: str, param: torch.nn.Parameter) -> bool:
    """BERT's rule: no weight decay on biases and LayerNorm weights."""
    lowered = name.lower()
    return not (name.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if is_decayed(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0},
    ]
    # fused=True runs one CUDA kernel for all parameters; torch's AdamW also means DeepSpeed builds
    # no FusedAdam of its own (which it would JIT-compile on CPU).
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, eps=config.adam_epsilon, fused=device.type == "cuda"
    )


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: 0 → 1 over warmup_steps, then linearly down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


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


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig, env: DistEnv):
        from spanqa.train.tracking import make_tracker

        self.config, self.env = config, env
        self.output_dir = Path(config.output_dir)
        setup_logging(env.rank)
        ds_path = config.deepspeed_config or default_deepspeed_config_path(
            env.device.type, env.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.ds_config, notes = reconcile_deepspeed_config(
            config, load_deepspeed_config(ds_path), env.world_size
        )
        for note in notes:
            log.info(note)
        log.info(f"world size {env.world_size} on {env.device.type}; deepspeed config {ds_path}")

        self._build_data()
        warmup = self._plan_steps()
        self._build_engine(warmup)

        self.step, self.epoch = 0, 0
        self.best_metric, self.best_step = -math.inf, None
        self._seconds_before = 0.0
        self.history: list[dict] = []
        resume_from = ckpt.resolve_resume(config.resume, self.output_dir)
        if resume_from is not None:
            self._load(resume_from)
        self.tracker = make_tracker(
            env.rank,
            self.output_dir,
            run_name=config.run_name,
            tags={"spanqa.tag": config.tag} if config.tag else None,
        )
        if resume_from is None:
            self._log_start()
        self._reset_window()
        log.info(
            f"{len(self.train_store)} training windows, {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps ({config.num_train_epochs:g} epochs), warmup {warmup}, micro-batch "
            f"{self.ds_config['train_micro_batch_size_per_gpu']} x accumulation {self.accum} x world "
            f"{env.world_size} = {config.train_batch_size}"
            + (f", stopping after step {self.stop_step}" if self.stop_step < self.total_steps else "")
        )

    def _build_data(self) -> None:
        from spanqa.data.loader import make_loader

        config, env = self.config, self.env
        self.tokenizer = load_tokenizer(config.model)
        self.train_store, self.dev_store = prepare_stores(config, self.tokenizer, env)
        self._golds = None  # the dev file's questions, read when first scored (rank 0)
        if self.dev_store is None:
            log.warning("no --dev_file: no evaluation, no best model")
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.loader, self.sampler = make_loader(
            self.train_store,
            micro,
            env.rank,
            env.world_size,
            config.seed,
            shuffle=True,
            num_workers=config.num_workers,
        )
        # A private generator for the DataLoader's worker seeds: iterating must not draw from the
        # global torch RNG, or a resumed run would see a different dropout stream than an uninterrupted one.
        self.loader.generator = torch.Generator().manual_seed(config.seed)

    def _plan_steps(self) -> int:
        """Steps per epoch, total and stop step, eval points; returns the warmup steps."""
        config = self.config
        self.accum = config.gradient_accumulation_steps
        self.steps_per_epoch = len(self.sampler) // self.accum
        if self.steps_per_epoch < 1:
            raise SpanqaError(
                f"--train_batch_size: {config.train_batch_size} leaves no full optimizer step in one epoch "
                f"of {len(self.train_store)} windows"
            )
        self.total_steps = max(1, round(config.num_train_epochs * self.steps_per_epoch))
        self.stop_step = min(self.total_steps, config.max_steps) if config.max_steps else self.total_steps
        warmup = (
            config.warmup_steps
            if config.warmup_steps is not None
            else round(config.warmup_proportion * self.total_steps)
        )
        self.eval_at = eval_points(
            self.steps_per_epoch, self.total_steps, config.eval_per_epoch, config.eval_steps
        )
        if self.dev_store is None:
            self.eval_at = set()
        return warmup

    def _build_engine(self, warmup: int) -> None:
        import deepspeed

        from spanqa.model.build import build_model

        config, env = self.config, self.env
        # The same seed on every rank, right before the head is built: its initialisation depends on
        # nothing that ran before (DeepSpeed also broadcasts rank 0's parameters)
        seed_everything(config.seed)
        model = build_model(config.model, config.head)
        if config.compile:
            model.compile()  # in place: parameter names (checkpoints, export) stay the same
        self.output_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
        optimizer = make_optimizer(model, config, env.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(warmup, self.total_steps)
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=dict(self.ds_config),
            dist_init_required=False,
        )
        self.model = self.engine.module
        # From here on each rank draws its own dropout masks (identical masks on every rank would
        # correlate the replicas' noise); a resumed run restores these streams per rank.
        seed_everything(config.seed + env.rank)
        self._own_grad_norm = not (
            self.engine.fp16_enabled() or self.engine.bfloat16_enabled() or self.engine.zero_optimization()
        )
        self._grad_norm = None

    # ---- training ---------------------------------------------------------------------------

    def train(self, preemption: PreemptionFlag | None = None) -> str:
        """Train to the end (or --max_steps, or a preemption signal). Returns "finished", "stopped"
        (at --max_steps), "preempted" (SIGTERM: saved, to stay ended) or "requeue" (SIGUSR1: saved;
        call `requeue()` once the MLflow run is closed).

        `preemption`: a flag the caller installed for the life of the process (see PreemptionFlag);
        without one, the trainer installs its own while it trains.
        """
        own_flag = preemption is None
        preemption = PreemptionFlag() if own_flag else preemption
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.env.is_main,
            desc="train",
            dynamic_ncols=True,
        )
        self._started = time.perf_counter()
        try:
            while self.step < self.stop_step:
                self.sampler.set_epoch(self.epoch)
                for batch in self.loader:
                    if self.sampler.batches_done > self.steps_per_epoch * self.accum:
                        break  # the micro-batches that cannot fill an accumulation group are dropped
                    self.train_step(batch, global_windows=self._global_batch_windows())
                    if self.sampler.batches_done % self.accum:
                        continue
                    self.step += 1
                    progress.update(1)
                    outcome = self._after_step(preemption)
                    if outcome != "continue":
                        return outcome
                    if self.step >= self.stop_step:
                        break
                if self.sampler.batches_done >= self.steps_per_epoch * self.accum:
                    self.epoch += 1
            if self.stop_step < self.total_steps:
                if self.step not in self.eval_at:
                    self.save()
                return "stopped"
            return "finished"
        finally:
            progress.close()
            if own_flag:
                preemption.restore()
            self._log_time()

    def train_step(self, batch: dict[str, torch.Tensor], global_windows: int | None = None) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the optimizer step for one micro-batch.
        Returns the loss on the device; nothing here waits for the device.

        `global_windows`: the windows of this step over all ranks. DeepSpeed averages the ranks'
        gradients with equal weights; when the split is uneven (the last batch of an epoch) each
        rank's loss is scaled by its share, so that the update is the one of the whole batch.
        """
        windows = len(batch["input_ids"])
        self._samples += windows
        self._tokens += int(batch["attention_mask"].sum())  # host tensor: no device sync
        inputs = self._to_device(batch)
        loss = self.engine(**inputs)["loss"]
        share = 1.0 if global_windows is None else windows * self.env.world_size / global_windows
        self.engine.backward(loss if share == 1.0 else loss * share)
        if self._own_grad_norm and self._logging_boundary():
            # DeepSpeed's plain fp32 path clips without keeping the norm; measure it (on the device)
            self._grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        self.engine.step()
        loss = loss.detach().float()
        # weighted by windows, so that the logged loss is the mean over the global batch whatever
        # the split across ranks (the last batch of an epoch splits unevenly)
        self._loss_sum += loss * windows
        self._micro += 1
        return loss

    def _global_batch_windows(self) -> int:
        """Windows in the global batch this rank's current micro-batch belongs to (all ranks)."""
        return len(self.sampler.global_batches()[self.sampler.batches_done - 1])

    def _logging_boundary(self) -> bool:
        """Whether this micro-batch ends an optimizer step whose metrics get logged."""
        next_step = self.step + 1
        ends_step = self.sampler.batches_done % self.accum == 0
        return ends_step and (next_step % self.config.logging_steps == 0 or next_step == self.stop_step)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: tensor.to(self.env.device, non_blocking=True)
            for name, tensor in batch.items()
            if name != "window_index"
        }

    def _after_step(self, preemption: PreemptionFlag) -> str:
        if self.config.log_param_checksum:
            self._write_param_checksum()
        logging_due = self.step % self.config.logging_steps == 0 or self.step == self.stop_step
        if logging_due or self.step % PREEMPTION_CHECK_STEPS == 0:
            stop, requeue = self._reduce_and_log(preemption, logging_due)
            if stop:
                log.warning(f"preemption signal: saving a checkpoint at step {self.step}")
                self.save()
                return "requeue" if requeue else "preempted"
        if self.step in self.eval_at:
            self.validate()
            self.save()
        return "continue"

    def _reset_window(self) -> None:
        self._loss_sum = torch.zeros((), device=self.env.device)
        self._micro = self._samples = self._tokens = 0
        self._window_started = time.perf_counter()

    def _reduce_and_log(self, preemption: PreemptionFlag, logging_due: bool) -> tuple[bool, bool]:
        """One all-reduce (the only host sync in the loop): the loss sum, counts and the preemption
        flags of every rank. Returns whether any rank received a preemption signal, and whether any
        received the one that asks for a requeue."""
        flags = [float(preemption.is_set), float(preemption.wants_requeue)]
        counts = torch.tensor(
            [self._micro, self._samples, self._tokens, *flags],
            dtype=torch.float32,
            device=self.env.device,
        )
        packed = torch.cat([self._loss_sum.reshape(1), counts]).double()
        loss_sum, micro, samples, tokens, signals, requeues = sum_tensors(packed).tolist()
        if logging_due and micro > 0:
            elapsed = time.perf_counter() - self._window_started
            metrics = {
                "loss": loss_sum / samples,
                "lr": self.scheduler.get_last_lr()[0],
                "samples_per_s": samples / elapsed,
                "tokens_per_s": tokens / elapsed,
                "epoch": self.step / self.steps_per_epoch,
            }
            metrics.update(self._optimizer_metrics())
            self._record(metrics)
            self._reset_window()
        return signals > 0, requeues > 0

    def _optimizer_metrics(self) -> dict[str, float]:
        metrics = {}
        norm = self.engine.get_global_grad_norm() if not self._own_grad_norm else self._grad_norm
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        if self.engine.fp16_enabled():
            scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(
                self.engine.optimizer, "loss_scale", None
            )
            if scale is not None:
                metrics["loss_scale"] = float(scale)
            metrics["skipped_steps"] = float(self.engine.skipped_steps)
        return metrics

    def _record(self, metrics: dict[str, float], kind: str = "train") -> None:
        """Rank 0: MLflow metrics at this step, and one line of OUTPUT_DIR/train_log.jsonl."""
        if not self.env.is_main:
            return
        entry = {"kind": kind, "step": self.step, **metrics}
        self.history.append(entry)
        with open(self.output_dir / TRAIN_LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.tracker.log_metrics(metrics, step=self.step)

    def _write_param_checksum(self) -> None:
        digest = hashlib.sha256()
        for param in self.model.parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes())
        folder = self.output_dir / "param_checksums"
        folder.mkdir(exist_ok=True)
        with open(folder / f"rank{self.env.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "sha256": digest.hexdigest()}) + "\n")

    # ---- evaluation -------------------------------------------------------------------------

    def validate(self) -> dict | None:
        """Every rank runs its shard of the dev windows; rank 0 selects answers, scores them and writes
        OUTPUT_DIR/eval/. Keeps the best model by --eval_metric. Returns the scores (on every rank)."""
        from spanqa.data.loader import make_loader
        from spanqa.eval.candidates import WindowCandidates

        if self.dev_store is None:
            return None
        started = time.perf_counter()
        loader, _ = make_loader(
            self.dev_store, self.config.eval_batch_size, self.env.rank, self.env.world_size, shuffle=False
        )
        loader.generator = torch.Generator().manual_seed(0)
        parts, indices = [], []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self.engine.eval()
        with torch.no_grad():
            for batch in loader:
                inputs = self._to_device(batch)
                outputs = self.engine(**inputs)
                loss_sum += outputs["loss"].double() * len(batch["input_ids"])
                parts.append(
                    self.model.candidates(
                        outputs,
                        inputs["context_mask"],
                        self.config.n_best_size,
                        self.config.max_answer_length,
                    )
                )
                indices.append(batch["window_index"].numpy())
        self.engine.train()
        mine = (WindowCandidates.concatenate(parts), np.concatenate(indices), float(loss_sum))
        gathered = gather_to_main(mine, self.env)
        scores = self._score(gathered, time.perf_counter() - started) if self.env.is_main else None
        scores = broadcast_from_main(scores, self.env)
        if scores[self.config.eval_metric] > self.best_metric:
            self.best_metric, self.best_step = scores[self.config.eval_metric], self.step
            if self.env.is_main:
                self._export_best()
        barrier()
        return scores

    def _score(self, gathered: list, seconds: float) -> dict:
        from spanqa.eval.candidates import WindowCandidates
        from spanqa.eval.evaluate import write_prediction_files
        from spanqa.eval.postprocess import select_answers
        from spanqa.eval.squad_metric import squad_v2_scores

        cands = WindowCandidates.concatenate([g[0] for g in gathered])
        window_indices = np.concatenate([g[1] for g in gathered])
        threshold = self.config.null_threshold
        predictions, null_odds = select_answers(cands, window_indices, self.dev_store, threshold)
        if self._golds is None:
            self._golds = gold_questions(self.dev_store, self.config.dev_file)
        scores = squad_v2_scores(self._golds, predictions, null_odds, null_threshold=threshold)
        scores["eval_loss"] = sum(g[2] for g in gathered) / len(window_indices)
        report = {
            **scores,
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "head": self.config.head,
            "eval_seconds": round(seconds, 3),
        }
        write_prediction_files(self.output_dir / "eval", predictions, null_odds, report)
        numeric = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._record({**numeric, "epoch": self.step / self.steps_per_epoch}, kind="eval")
        log.info(
            f"eval at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f}): "
            f"exact {scores['exact']:.2f} "
            f"f1 {scores['f1']:.2f} best_f1 {scores.get('best_f1', float('nan')):.2f} "
            f"eval_loss {scores['eval_loss']:.4f} ({seconds:.1f} s)"
        )
        return scores

    def _export_best(self) -> None:
        from spanqa.model.build import export_model

        settings = {
            "max_seq_length": self.config.max_seq_length,
            "doc_stride": self.config.doc_stride,
            "max_query_length": self.config.max_query_length,
            "max_answer_length": self.config.max_answer_length,
            "n_best_size": self.config.n_best_size,
            # a finite number (JSON has no infinity); predict answers always when not version 2
            "null_threshold": self.config.null_score_diff_threshold,
            "version_2_with_negative": self.config.version_2_with_negative,
            "base_model": self.config.model,
            "step": self.step,
            self.config.eval_metric: self.best_metric,
        }
        export_model(self.model, self.tokenizer, self.output_dir / "best_model", settings)
        log.info(
            f"best {self.config.eval_metric} {self.best_metric:.2f}: "
            f"exported to {self.output_dir / 'best_model'}"
        )

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self) -> Path:
        """Collective: every rank saves its part; rank 0 marks the checkpoint complete afterwards."""
        root = ckpt.checkpoint_root(self.output_dir)
        tag = ckpt.tag_for(self.step)
        client_state = {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": self.sampler.state_dict(),
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "world_size": self.env.world_size,
            "train_seconds": self._train_seconds(),
        }
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        ckpt.save_rng(root / tag, self.env.rank)
        barrier()
        if self.env.is_main:
            ckpt.mark_complete(
                root / tag, {"step": self.step, "epoch": self.epoch, "world_size": self.env.world_size}
            )
            ckpt.prune(root, KEEP_CHECKPOINTS)
            log.info(f"checkpoint {root / tag}")
        barrier()
        return root / tag

    def _load(self, path: Path) -> None:
        loaded, state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise SpanqaError(f"--resume: {path}: DeepSpeed could not load it")
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.best_metric = state["best_metric"]
        self.best_step = state["best_step"]
        self._seconds_before = float(state.get("train_seconds", 0.0))
        sampler_state = dict(state["sampler"])
        if sampler_state["batches_done"] >= self.steps_per_epoch * self.accum:
            sampler_state = {"epoch": sampler_state["epoch"] + 1, "batches_done": 0}
            self.epoch = sampler_state["epoch"]
        self.sampler.load_state_dict(sampler_state)
        rng = ckpt.load_rng(path, self.env.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        if self.env.is_main:
            self.history = _read_history(self.output_dir / TRAIN_LOG, self.step)
        log.info(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def requeue(self) -> None:
        """Rank 0 asks SLURM to run the job again (outside SLURM: nothing to do); all ranks wait."""
        job = slurm_job_to_requeue()
        if self.env.is_main and job is not None:
            log.warning(requeue_slurm_job(job))
        barrier()

    # ---- tracking ---------------------------------------------------------------------------

    def _log_start(self) -> None:
        if not self.env.is_main:
            return
        ds_file = self.output_dir / "ds_config.json"
        _write_json(ds_file, self.ds_config)
        self.tracker.log_params(
            {
                "config": self.config.to_dict(),
                "deepspeed": self.ds_config,
                "world_size": self.env.world_size,
                "device": self.env.device.type,
                "versions": package_versions(),
                "git_commit": git_commit() or "none",
                "train_windows": len(self.train_store),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
            }
        )
        self.tracker.log_artifact(ds_file)
        for role, store in (("train", self.train_store), ("dev", self.dev_store)):
            if store is not None:
                self.tracker.log_artifact(Path(store.path) / "meta.json", f"data/{role}")

    def _log_time(self) -> None:
        if self.env.is_main and hasattr(self, "_started"):
            self.tracker.log_metrics({"train_seconds": self._train_seconds()}, step=self.step)

    def _train_seconds(self) -> float:
        """Training wall time, summed over the runs a resumed job consisted of."""
        started = getattr(self, "_started", None)
        return self._seconds_before + (time.perf_counter() - started if started is not None else 0.0)

    def close(self, status: str = "FINISHED") -> None:
        """Artifacts (eval files, curves), then the MLflow run; safe to call on every rank."""
        if self.env.is_main:
            from spanqa.train.plots import plot_training_curves

            curves = plot_training_curves(self.history, self.output_dir / "training_curves.png")
            self.tracker.log_artifact(curves)
            for name in ("eval_report.json", "predictions.json", "null_odds.json"):
                if (self.output_dir / "eval" / name).is_file():
                    self.tracker.log_artifact(self.output_dir / "eval" / name, "eval")
        self.tracker.close(status)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the spanqa checkout, when it is one."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _write_json(path: Path, content) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_history(path: Path, up_to_step: int) -> list[dict]:
    """The logged records up to the checkpoint's step; later ones (from an interrupted run) are dropped
    from the file too, because the resumed run logs those steps again."""
    if not path.is_file():
        return []
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [h for h in history if h["step"] <= up_to_step]
    if len(kept) != len(history):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in kept))
        os.replace(tmp, path)
    return kept
