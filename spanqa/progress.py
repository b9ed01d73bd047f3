"""Progress for a person: a tqdm bar on a terminal; where stderr is not one (a log file, a SLURM job's
output) a bar would be redrawn in place with carriage returns, fragments a reader cannot follow, so a
progress line is written every half minute instead. Every loop of spanqa that shows progress asks here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINE_INTERVAL_S = 30.0  # a log file's progress lines: one per half minute reads well in any job


class ProgressLines:
    """tqdm's methods that spanqa's loops use, as a line every `interval` seconds through `write`
    (default: stderr) ("train: 120/302 steps (40%), 1.98 s/step, 6m00s left, loss=3.2104, lr=8.1e-05").
    Work shorter than `interval` writes nothing: what it did is said by the line that follows it."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.write = write or (lambda line: tqdm.write(line, file=sys.stderr))
        self.started = self.last_line = clock()
        self.first = initial
        self.postfix: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.write(self.line(now))

    def line(self, now: float) -> str:
        done, elapsed = self.n - self.first, now - self.started
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}s{share}"
        if done > 0 and elapsed > 0:  # a coarse clock may not have moved yet
            per = elapsed / done
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


def progress_bar(
    total: int,
    desc: str,
    enabled: bool,
    unit: str = "it",
    initial: int = 0,
    write: Callable[[str], None] | None = None,
) -> tqdm | ProgressLines:
    """A bar on stderr, or progress lines (through `write`) where stderr is not a terminal; disabled: a
    no-op object with the same methods."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, desc, unit, initial, write=write)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def tracked(items: Sequence[T], desc: str, enabled: bool, unit: str = "it") -> Iterator[T]:
    """`items` one by one, advancing a progress_bar over them."""
    with progress_bar(len(items), desc, enabled, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
