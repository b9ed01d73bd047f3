"""What training measures: loss, samples, real tokens, model FLOPs and step times, reduced over ranks.

Per micro-batch only host numbers are touched (the batch's lengths are on the host before it is copied
to the device) and the loss is added on the device: nothing waits for the device. Every
--logging_steps one all-reduce (the loop's only host sync) sums the window's counters over the ranks;
the logged figures are the loss (the mean over the window's samples), samples/s, tokens/s and MFU
(model FLOPs per second over the device's dense peak, `spanqa.flops`).

Each optimizer step also leaves a `StepRecord` of this rank (its windows, tokens, FLOPs and time,
timed with CUDA events on a GPU so that no step waits), which `bench/throughput.py` reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spanqa.flops import DevicePeak, EncoderShape, batch_train_flops
from spanqa.train.distributed import DistEnv, sum_tensors


@dataclass
class StepRecord:
    windows: int
    real_tokens: int
    padded_tokens: int
    flops: int
    seconds: float | None = None  # filled in at the next reduction (a CUDA event until then)


class StepMetrics:
    def __init__(self, env: DistEnv, shape: EncoderShape, peak: DevicePeak):
        self.env, self.shape, self.peak = env, shape, peak
        self.records: list[StepRecord] = []
        self._current = StepRecord(0, 0, 0, 0)
        self._marks: list = []  # (record index, event or perf_counter time) since the last reduction
        self._anchor = None
        self._reset_window()

    def _reset_window(self) -> None:
        # float64 on the device: a window carried over a checkpoint adds up like one that was not
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self._window = StepRecord(0, 0, 0, 0)
        self._window_started = time.perf_counter()
        self._seconds_before = 0.0  # of a window that began before the checkpoint this run resumed from

    def start(self) -> None:
        """Mark the start of training (the first step's time counts from here)."""
        self._anchor = self._mark()
        self._window_started = time.perf_counter()

    def micro_batch(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Count one micro-batch (host tensors of the batch) and add its loss × windows on the device."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        current = self._current
        current.windows += len(lengths)
        current.real_tokens += sum(lengths)
        current.padded_tokens += batch["attention_mask"].numel()
        current.flops += batch_train_flops(self.shape, lengths)
        self._loss_sum += loss.detach().double() * len(lengths)

    def step_done(self) -> None:
        """An optimizer step ended: close its record."""
        record, self._current = self._current, StepRecord(0, 0, 0, 0)
        self.records.append(record)
        for name in ("windows", "real_tokens", "padded_tokens", "flops"):
            setattr(self._window, name, getattr(self._window, name) + getattr(record, name))
        self._marks.append((len(self.records) - 1, self._mark()))

    def reduce(
        self, flags: list[float], window_ends: bool = True
    ) -> tuple[dict[str, float] | None, list[float]]:
        """One all-reduce of the window's loss and counters and of `flags` (e.g. preemption signals).
        Returns the summed flags, and when `window_ends` the window's figures (None when no step ran
        in it), after which a new window starts."""
        window = self._window
        counts = [window.windows, window.real_tokens, window.flops, *flags]
        counts = torch.tensor(counts, dtype=torch.float64, device=self.env.device)
        packed = torch.cat([self._loss_sum.reshape(1), counts])
        loss_sum, windows, tokens, flops, *summed = sum_tensors(packed).tolist()
        self._resolve_times()
        if not window_ends or windows == 0:
            return None, summed
        elapsed = time.perf_counter() - self._window_started + self._seconds_before
        figures = {
            "loss": loss_sum / windows,
            "samples_per_s": windows / elapsed,
            "tokens_per_s": tokens / elapsed,
            "mfu": flops / elapsed / (self.peak.flops_per_s * self.env.world_size),
        }
        self._reset_window()
        return figures, summed

    def window_state(self) -> dict[str, float]:
        """Collective: the open logging window summed over the ranks, for a checkpoint (a resumed run
        then logs the same windows as an uninterrupted one)."""
        window = self._window
        counts = [window.windows, window.real_tokens, window.padded_tokens, window.flops]
        packed = torch.cat(
            [self._loss_sum.reshape(1), torch.tensor(counts, dtype=torch.float64, device=self.env.device)]
        )
        loss_sum, windows, tokens, padded, flops = sum_tensors(packed).tolist()
        seconds = time.perf_counter() - self._window_started + self._seconds_before
        return {
            "loss_sum": loss_sum,
            "windows": windows,
            "real_tokens": tokens,
            "padded_tokens": padded,
            "flops": flops,
            "seconds": seconds,
        }

    def restore_window(self, state: dict[str, float]) -> None:
        """Carry a checkpoint's open window on (its sums on rank 0, so that they count once)."""
        if not self.env.is_main or not state:
            return
        self._loss_sum += state["loss_sum"]
        for name in ("windows", "real_tokens", "padded_tokens", "flops"):
            setattr(self._window, name, int(state[name]))
        self._seconds_before = state["seconds"]

    def _mark(self):
        if self.env.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _resolve_times(self) -> None:
        """Step times from the marks (the reduction has just synchronised the device)."""
        for index, mark in self._marks:
            if self._anchor is not None:
                if self.env.device.type == "cuda":
                    self.records[index].seconds = self._anchor.elapsed_time(mark) / 1000
                else:
                    self.records[index].seconds = mark - self._anchor
            self._anchor = mark
        self._marks = []


def optimizer_metrics(engine, grad_norm: torch.Tensor | None) -> dict[str, float]:
    """Grad norm, and under fp16 the loss scale and the count of skipped (overflowed) steps."""
    metrics = {}
    norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    if engine.fp16_enabled():
        scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
        if scale is not None:
            metrics["loss_scale"] = float(scale)
        metrics["skipped_steps"] = float(engine.skipped_steps)
    return metrics
