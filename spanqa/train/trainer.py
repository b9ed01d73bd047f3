"""The Trainer: DeepSpeed engine over an encoder + answer head, the training loop, evaluation, checkpoints.

    trainer = Trainer(config, env)      # data, model, AdamW + schedule, DeepSpeed, tracker, resume
    trainer.train()                     # train_step() per micro-batch, validate() + save() at eval points
    trainer.close()

Its parts, each in its own module: data (stores, batches, golds), optim (AdamW, schedule, the plan in
steps), metrics (counters reduced every --logging_steps, MFU), evaluator (dev scores), checkpoint
(layout), tracking (MLflow on rank 0). Everything a checkpoint must restore of the loop is `TrainState`.

Fast path (each on by default where it helps): SDPA attention (build_model), fused torch AdamW on
CUDA, batches padded only to their longest window rounded up to 8, pinned host memory with
non-blocking copies, no host sync per step (losses stay on the device and are read, reduced over
ranks and logged every --logging_steps), `--compile` for torch.compile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spanqa import io
from spanqa.config import TrainConfig
from spanqa.data.store import STATS_DIR
from spanqa.eval.scoring import selection_score
from spanqa.export import ExportInfo, export_model
from spanqa.flops import EncoderShape, device_peak
from spanqa.train import checkpoint as ckpt
from spanqa.train import ds_engine
from spanqa.train.data import setup_data
from spanqa.train.distributed import DistEnv, barrier, on_every_rank, on_main
from spanqa.train.evaluator import EVAL_DIR, Evaluator
from spanqa.train.metrics import StepMetrics, optimizer_metrics
from spanqa.train.optim import plan
from spanqa.train.output_dir import FINISHED, OutputDirLock, check_fresh_or_resumed
from spanqa.train.progress import bar, setup_logging
from spanqa.train.run_info import run_params
from spanqa.train.run_log import RunLog, write_param_checksum
from spanqa.train.signals import PreemptionFlag, requeue_slurm_job, slurm_job_to_requeue
from spanqa.train.system_metrics import start_system_metrics

log = logging.getLogger("spanqa.train")
PREEMPTION_CHECK_STEPS = 10  # ranks agree on a received signal at least this often (one tiny all-reduce)


@dataclass
class TrainState:
    """Where the loop is, and what it has found: all that a checkpoint restores besides the engine.

    The position is saved in optimizer steps (`epoch_step`), not micro-batches: a run resumed with
    another world size or accumulation continues at the same global batch."""

    accumulation: int  # micro-batches per optimizer step (this run's, not saved)
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_step: int = 0  # micro-batches of `epoch` done (accumulation boundaries: multiples of accum)
    best_metric: float | None = None  # the best --eval_metric so far, and its step
    best_step: int | None = None
    train_seconds: float = 0.0  # training wall time of the earlier processes of this run

    def state_dict(self) -> dict:
        state = {k: v for k, v in asdict(self).items() if k not in ("accumulation", "micro_step")}
        return {**state, "epoch_step": self.micro_step // self.accumulation}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "epoch", "best_metric", "best_step", "train_seconds"):
            setattr(self, key, state[key])
        self.micro_step = int(state["epoch_step"]) * self.accumulation


class Trainer:
    def __init__(self, config: TrainConfig, env: DistEnv):
        from spanqa.train.tracking import make_tracker

        self.config, self.env = config, env
        self.output_dir = Path(config.output_dir)
        setup_logging(env.rank, config.verbose)
        self.ds_config = on_every_rank(self._checked_ds_config, env)
        self.data = on_every_rank(lambda: setup_data(config, env), env)
        self.schedule = plan(config, self.data.steps_per_epoch, self.data.dev_store is not None)
        self.engine, self.scheduler = ds_engine.build_engine(config, self.ds_config, self.schedule, env)
        self.model = self.engine.module
        self.output_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
        self.lock = OutputDirLock(self.output_dir)
        on_main(self._claim_output_dir, env)
        self.state = TrainState(accumulation=config.gradient_accumulation_steps)
        resumed = self._resume()
        tags = {"spanqa.tag": config.tag} if config.tag else None
        self.tracker = make_tracker(env.rank, self.output_dir, run_name=config.run_name, tags=tags)
        self.run_log = RunLog(self.output_dir, self.tracker, env.is_main)
        self.system_metrics = start_system_metrics(self.tracker, config.system_metrics)  # rank 0 only
        if config.resume != "none":  # with no checkpoint yet (killed before the first), from step 0
            self.run_log.resume_at(self.state.step)
            self.tracker.backfill(self.run_log.history)
        if resumed is None and env.is_main:
            self._log_start()
        self.evaluator = Evaluator(self.data, self.output_dir) if self.data.dev_store is not None else None
        barrier()  # every rank measures the peak at once (on a CPU they share the cores, as in training)
        peak = device_peak(env.device, ds_engine.compute_dtype(self.engine), repeats=3)
        self.metrics = StepMetrics(env, EncoderShape.from_config(self.model.config, config.head), peak)
        self.metrics.restore_window((resumed or {}).get("metrics_window", {}))
        self._own_grad_norm = ds_engine.clips_without_norm(self.engine)
        self._grad_norm = None
        self._started: float | None = None
        self._log_plan()

    def _checked_ds_config(self) -> dict:
        """The DeepSpeed config, once it and the output directory are known to work (before minutes of
        preparing data and loading the model)."""
        ds_config = ds_engine.resolve_config(self.config, self.env)
        io.check_writable_dir(self.output_dir, "--output_dir")
        return ds_config

    def _resume(self) -> dict | None:
        """Load the checkpoint --resume names (rank 0 picks and verifies it); its client state."""
        path = on_main(lambda: ckpt.resolve_resume(self.config.resume, self.output_dir), self.env)
        if path is None:
            return None
        on_main(lambda: ckpt.check_same_head(path, self.head_flags()), self.env)
        on_main(lambda: ckpt.check_world_size(path, self.env.world_size), self.env)
        client_state = ckpt.load(self.engine, path, self.env.rank)
        self.state.load_state_dict(client_state["trainer"])
        log.info(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})")
        return client_state

    def _claim_output_dir(self) -> None:
        """Rank 0: this job's lock on the directory, and a fresh run never joining an old one."""
        self.lock.acquire()
        check_fresh_or_resumed(self.output_dir, self.config.resume, self.config.overwrite_output_dir)

    def _log_plan(self) -> None:
        s, config = self.schedule, self.config
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        windows = len(self.data.train_store)
        epochs = f"{config.num_train_epochs:g} epoch{'' if config.num_train_epochs == 1 else 's'}"
        log.info(
            f"{windows} training windows, {s.steps_per_epoch} steps/epoch, {s.total_steps} "
            f"steps ({epochs}), warmup {s.warmup_steps}, micro-batch {micro} x "
            f"accumulation {config.gradient_accumulation_steps} x world {self.env.world_size} = "
            f"{config.train_batch_size}"
            + (f", stopping after step {s.stop_step}" if s.stop_step < s.total_steps else "")
        )

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
        preemption.arm()
        progress = bar(
            self.schedule.total_steps, "train", self.env.is_main, unit="step", initial=self.state.step
        )
        self._started = time.perf_counter()
        self.metrics.start()
        try:
            return self._loop(preemption, progress)
        finally:
            progress.close()
            if own_flag:
                preemption.restore()
            if self.env.is_main:
                self.tracker.log_metrics({"train_seconds": self.train_seconds()}, step=self.state.step)

    def _loop(self, preemption: PreemptionFlag, progress) -> str:
        state, schedule, accum = self.state, self.schedule, self.config.gradient_accumulation_steps
        while state.step < schedule.stop_step:
            for batch in self.data.train_loader(state.epoch, state.micro_step):
                self.train_step(batch)
                if state.micro_step % accum:
                    continue
                state.step += 1
                if state.micro_step == self.data.micro_steps_per_epoch:
                    state.epoch, state.micro_step = state.epoch + 1, 0
                progress.update(1)
                outcome = self._after_step(preemption, progress)
                if outcome != "continue":
                    return outcome
                if state.step >= schedule.stop_step:
                    break
        if schedule.stop_step < schedule.total_steps:
            if state.step not in schedule.eval_at:
                self.save()
            return "stopped"
        self._finish()
        return "finished"

    def _finish(self) -> None:
        """The run trained to its end: nothing is left to resume, so its checkpoints go (its best model
        and eval files stay); `finished` says so to a later --resume auto."""
        if self.env.is_main:
            io.write_json(
                self.output_dir / FINISHED, {"step": self.state.step, "train_seconds": self.train_seconds()}
            )
            removed = ckpt.remove_all(ckpt.checkpoint_root(self.output_dir))
            if removed:
                best = self.output_dir / "best_model"
                log.info(f"finished: removed {len(removed)} checkpoint(s); the best model is in {best}")
        barrier()

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the optimizer step for one micro-batch.
        Returns the loss on the device; nothing here waits for the device."""
        inputs = {
            k: v.to(self.env.device, non_blocking=True) for k, v in batch.items() if k != "window_index"
        }
        loss = self.engine(**inputs)["loss"]
        self.engine.backward(loss)
        self.state.micro_step += 1
        boundary = self.state.micro_step % self.config.gradient_accumulation_steps == 0
        if boundary and self._own_grad_norm and self._logging_due(self.state.step + 1):
            self._grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        self.engine.step()
        self.metrics.micro_batch(batch, loss)
        if boundary:
            self.metrics.step_done()
        return loss

    def _logging_due(self, step: int) -> bool:
        """Every --logging_steps, and at the run's last step. A stop at --max_steps logs nothing of its
        own: its open window goes into the checkpoint, so a resumed run logs the same windows."""
        return step % self.config.logging_steps == 0 or step == self.schedule.total_steps

    def _after_step(self, preemption: PreemptionFlag, progress) -> str:
        step = self.state.step
        if self.config.log_param_checksum:
            write_param_checksum(self.model, self.output_dir, self.env.rank, step)
        logging_due = self._logging_due(step)
        if logging_due or step % PREEMPTION_CHECK_STEPS == 0:
            flags = [float(preemption.is_set), float(preemption.wants_requeue)]
            figures, (signals, requeues) = self.metrics.reduce(flags, window_ends=logging_due)
            if figures is not None:
                figures["lr"] = self.scheduler.get_last_lr()[0]
                figures["epoch"] = step / self.schedule.steps_per_epoch
                figures.update(
                    optimizer_metrics(self.engine, self._grad_norm if self._own_grad_norm else None)
                )
                self.run_log.record(step, figures)
                progress.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{figures['lr']:.2e}", refresh=False)
            if signals > 0:
                log.warning(f"preemption signal: saving a checkpoint at step {step}")
                self.save()
                return "requeue" if requeues > 0 else "preempted"
        if step in self.schedule.eval_at:
            self.validate()
            if step < self.schedule.total_steps:  # the last step's checkpoint would go at once (_finish)
                self.save()
        return "continue"

    # ---- evaluation -------------------------------------------------------------------------

    def validate(self) -> dict | None:
        """Score the model on the dev set (every rank); keep the best model by --eval_metric."""
        if self.evaluator is None:
            return None
        state = self.state
        self.engine.eval()
        scores = self.evaluator.evaluate(
            self.engine, self.model, state.step, state.step / self.schedule.steps_per_epoch
        )
        self.engine.train()
        numeric = {k: float(v) for k, v in scores.items() if isinstance(v, int | float) and math.isfinite(v)}
        # question counts describe the dev set, not the model: params (flat charts as metrics)
        counts = {k: int(numeric.pop(k)) for k in list(numeric) if k.endswith("total")}
        self.tracker.log_params({"dev": counts})
        self.run_log.record(
            state.step, {**numeric, "epoch": state.step / self.schedule.steps_per_epoch}, "eval"
        )
        value = selection_score(scores, self.config.eval_metric)
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step = value, state.step
            if self.env.is_main:
                self._export_best(self.evaluator.model_threshold(scores))
        barrier()
        return scores

    def _export_best(self, threshold: float) -> None:
        """The model as it is now, answering with `threshold` (the tuned one when it was tuned)."""
        config, out = self.config, self.output_dir / "best_model"
        answers = config.answers
        if answers.version_2_with_negative:
            answers = dataclasses.replace(answers, null_score_diff_threshold=threshold)
        finite = threshold if math.isfinite(threshold) else None  # v1.1: never "no answer"; JSON has no inf
        metric = {"name": config.eval_metric, "value": self.state.best_metric, "null_threshold": finite}
        info = ExportInfo(config.head, config.windows, answers, config.model, self.state.step, metric)
        export_model(self.model, self.data.tokenizer, out, info, evaluation=self.output_dir / EVAL_DIR)
        best = f"best {config.eval_metric} {self.state.best_metric:.2f}"
        log.info(f"{best}: exported to {out} (null threshold {finite})")

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self) -> Path:
        """Collective: a complete checkpoint of this step (see spanqa.train.checkpoint)."""
        client_state = {
            "trainer": {**self.state.state_dict(), "train_seconds": self.train_seconds()},
            "metrics_window": self.metrics.window_state(),
            "mlflow_run_id": getattr(self.tracker, "run_id", None),
            "world_size": self.env.world_size,
        }
        return ckpt.save(
            self.engine,
            self.output_dir,
            self.state.step,
            client_state,
            self.env,
            self.config.keep_checkpoints,
            self.head_flags(),
        )

    def head_flags(self) -> dict[str, str]:
        """The flags that shape the head's weights: a checkpoint resumes only under the same."""
        if self.config.head == "crf":
            return {"head": "crf", "crf_tags": self.config.crf_tags}
        return {"head": self.config.head}

    def requeue(self) -> None:
        """Rank 0 asks SLURM to run the job again (outside SLURM: nothing to do); all ranks wait."""
        job = slurm_job_to_requeue()
        if self.env.is_main and job is not None:
            log.warning(requeue_slurm_job(job))
        barrier()

    # ---- tracking ---------------------------------------------------------------------------

    def _log_start(self) -> None:
        ds_file = io.write_json(self.output_dir / "ds_config.json", self.ds_config)
        self.tracker.log_params(run_params(self))
        self.tracker.log_artifact(ds_file)
        for role, store in (("train", self.data.train_store), ("dev", self.data.dev_store)):
            if store is not None:
                self.tracker.log_artifact(Path(store.path) / "meta.json", f"data/{role}")
                if (Path(store.path) / STATS_DIR).is_dir():  # stats.json and the length histograms
                    self.tracker.log_artifact(Path(store.path) / STATS_DIR, f"data/{role}/stats")

    def train_seconds(self) -> float:
        """Training wall time, summed over the processes a resumed run consisted of."""
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.state.train_seconds + running

    def close(self, status: str = "FINISHED") -> None:
        """Artifacts (eval files, curves), the best model as an MLflow model, then the MLflow run; safe
        to call on every rank."""
        self.system_metrics.stop()
        if self.env.is_main:
            from spanqa.train.plots import plot_training_curves

            curves = plot_training_curves(self.run_log.history, self.output_dir / "training_curves.png")
            self.tracker.log_artifact(curves)
            for name in ("eval_report.json", "predictions.json", "null_odds.json"):
                if (self.output_dir / "eval" / name).is_file():
                    self.tracker.log_artifact(self.output_dir / "eval" / name, "eval")
            if status == "FINISHED":
                from spanqa.train.mlflow_model import log_best_model

                log_best_model(self.tracker, self.output_dir / "best_model", self.config.register_model)
        self.tracker.close(status)
