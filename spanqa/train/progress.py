"""What a person watching a run sees: rank-prefixed log lines and progress bars that never mix.

Log lines go through tqdm's writer, so a line never glues onto a bar that is being drawn. Rank 0 says
what happens; the other ranks only warn. When stderr is not a terminal (a log file, a SLURM job's
output) a bar would be redrawn in place with carriage returns, fragments a reader cannot follow: there a
progress line is logged every half minute instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger("spanqa.train")


class TqdmHandler(logging.Handler):
    """Writes each record on its own line above any live bar (plain stderr when there is none)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the training loop
            self.handleError(record)


def setup_logging(rank: int, verbose: bool = False) -> None:
    """spanqa's lines on rank 0 (every rank's with `verbose`); DeepSpeed's own only from warning up
    unless `verbose`."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 or verbose else logging.WARNING)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for ds_handler in deepspeed_logger.handlers:
        ds_handler.setLevel(logging.NOTSET)  # its handlers carry levels of their own: let the logger's decide


LINE_INTERVAL_S = 30.0  # a log file's progress lines: one per half minute reads well in any job


class ProgressLines:
    """tqdm's methods that the trainer and evaluator use, as a log line every `interval` seconds
    ("train: 120/302 steps (40%), 1.98 s/step, 6m00s left, loss=3.2104, lr=8.1e-05"). Work shorter
    than `interval` writes nothing: its own log line follows."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval, self.clock = interval, clock
        self.started = self.last_line = clock()
        self.first = initial
        self.postfix: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        done = self.n - self.first
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s{share}"
        if done > 0:
            per = (now - self.started) / done
            left = max(self.total - self.n, 0) * per
            rate = f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}s/s"
            text += f", {rate}, {int(left // 60)}m{int(left % 60):02d}s left"
        return text + "".join(f", {k}={v}" for k, v in self.postfix.items())

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def close(self) -> None:
        pass

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int, desc: str, enabled: bool, unit: str = "it", initial: int = 0) -> tqdm | ProgressLines:
    """A progress bar on stderr, or progress lines where stderr is not a terminal (disabled: a no-op
    object with the same methods)."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, desc, unit, initial)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
    )
