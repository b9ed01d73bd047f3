"""Progress a person can read in a log file: lines every interval instead of a bar's carriage returns."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from tqdm import tqdm

from spanqa import progress
from spanqa.progress import ProgressLines, progress_bar, tracked
from spanqa.train.progress import bar, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_each_interval_with_rate_time_left_and_postfix():
    clock, lines = Clock(), []
    work = ProgressLines(300, "train", "step", initial=100, interval=30.0, clock=clock, write=lines.append)
    for _ in range(20):  # 2 s a step: a line after the 15th step, none before
        clock.now += 2.0
        work.update(1)
        if work.n == 110:
            work.set_postfix(loss="3.2104", lr="8.10e-05", refresh=False)
    assert lines == ["train: 115/300 steps (38%), 2.00 s/step, 6m10s left, loss=3.2104, lr=8.10e-05"]


def test_fast_work_gives_a_rate_per_second_and_short_work_no_line():
    clock, lines = Clock(), []
    with ProgressLines(1000, "eval", "window", interval=30.0, clock=clock, write=lines.append) as work:
        work.update(64)
        clock.now += 29.0
        work.update(64)
        assert lines == []
        clock.now += 2.0
        work.update(64)
    assert lines == ["eval: 192/1,000 windows (19%), 6.2 windows/s, 2m10s left"]


def test_a_terminal_gets_the_bar_and_a_log_file_the_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(bar(10, "train", True), tqdm)
    assert isinstance(progress_bar(10, "predict", True), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(bar(10, "train", True), ProgressLines)
    assert isinstance(progress_bar(10, "predict", True), ProgressLines)
    assert bar(10, "train", False).disable  # other ranks: tqdm's no-op either way
    assert progress.LINE_INTERVAL_S == 30.0


@pytest.fixture
def rank0_logging():
    logger = logging.getLogger("spanqa.train")
    saved = logger.handlers[:], logger.propagate, logger.level
    setup_logging(rank=0)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def test_training_lines_carry_the_rank_prefix_and_others_go_to_stderr_bare(
    monkeypatch, capsys, rank0_logging
):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # a line at every update
    with bar(4, "train", True, unit="step") as work:  # capsys: stderr is not a terminal
        work.update(4)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[rank 0] ") and err[0].split(" ", 3)[3].startswith("train: 4/4 steps (100%)")
    assert list(tracked(["a", "b", "c"], "windows", True, unit="question")) == ["a", "b", "c"]
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("windows: 3/3 questions (100%), ") and "\r" not in "".join(err)


def test_a_clock_that_has_not_moved_gives_no_rate():
    lines = []
    ProgressLines(10, "predict", "window", interval=0.0, clock=Clock(), write=lines.append).update(2)
    assert lines == ["predict: 2/10 windows (20%)"]


def test_tracked_short_work_writes_nothing(capsys):
    assert list(tracked(range(5), "windows", True)) == [0, 1, 2, 3, 4]
    assert list(tracked(range(5), "windows", False)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
