"""Progress a person can read in a log file: lines every interval instead of a bar's carriage returns."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from tqdm import tqdm

from spanqa.train import progress
from spanqa.train.progress import ProgressLines, bar, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(capsys):
    """What rank 0 logs, line by line, without its "[rank 0] HH:MM:SS " prefix."""
    logger = logging.getLogger("spanqa.train")
    saved = logger.handlers[:], logger.propagate, logger.level
    setup_logging(rank=0)
    seen: list[str] = []

    def read() -> list[str]:
        seen.extend(line.split(" ", 3)[3] for line in capsys.readouterr().err.splitlines())
        return seen

    yield read
    logger.handlers[:], logger.propagate, logger.level = saved


def test_a_line_each_interval_with_rate_time_left_and_postfix(lines):
    clock = Clock()
    work = ProgressLines(300, "train", "step", initial=100, interval=30.0, clock=clock)
    for _ in range(20):  # 2 s a step: a line after the 15th step, none before
        clock.now += 2.0
        work.update(1)
        if work.n == 110:
            work.set_postfix(loss="3.2104", lr="8.10e-05", refresh=False)
    assert lines() == ["train: 115/300 steps (38%), 2.00 s/step, 6m10s left, loss=3.2104, lr=8.10e-05"]


def test_fast_work_gives_a_rate_per_second_and_short_work_no_line(lines):
    clock = Clock()
    with ProgressLines(1000, "eval", "window", interval=30.0, clock=clock) as work:
        work.update(64)
        clock.now += 29.0
        work.update(64)
        assert lines() == []
        clock.now += 2.0
        work.update(64)
    assert lines() == ["eval: 192/1,000 windows (19%), 6.2 windows/s, 2m10s left"]


def test_a_terminal_gets_the_bar_and_a_log_file_the_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(bar(10, "train", True), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(bar(10, "train", True), ProgressLines)
    assert bar(10, "train", False).disable  # other ranks: tqdm's no-op either way
    assert progress.LINE_INTERVAL_S == 30.0
