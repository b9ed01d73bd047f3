"""The paired bootstrap (spanqa.eval.bootstrap) against figures worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from spanqa.eval.bootstrap import agreement, bootstrap_from_indices, paired_bootstrap

A = [1, 0, 1, 1]
B = [0, 0, 1, 0]  # per-question differences 1, 0, 0, 1: observed mean 0.5
DRAWS = [[0, 0, 0, 0], [1, 2, 1, 2], [0, 1, 2, 3], [3, 3, 1, 2], [1, 1, 1, 3]]


def test_a_case_worked_out_by_hand():
    result = bootstrap_from_indices(A, B, DRAWS)
    # resampled mean differences: 1, 0, 0.5, 0.5, 0.25
    assert result.difference == 0.5 and result.resamples == 5 and result.questions == 4
    # percentiles with linear interpolation over the sorted 0, .25, .5, .5, 1:
    # 2.5th at rank 0.1 -> 0.025, 97.5th at rank 3.9 -> 0.5 + 0.9 x 0.5 = 0.95
    assert result.low == pytest.approx(0.025) and result.high == pytest.approx(0.95)
    # draws at least 0.5 away from the observed 0.5: the first two (1 and 0) -> p = (1 + 2) / (1 + 5)
    assert result.p_value == 0.5


def test_the_draws_are_the_documented_stream_whatever_the_block_size():
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    expected = bootstrap_from_indices(a, b, np.random.default_rng(11).integers(0, 50, size=(23, 50)), seed=11)
    for block in (1, 5, 23, 1000):
        assert paired_bootstrap(a, b, resamples=23, seed=11, block=block) == expected
    assert paired_bootstrap(a, b, 23, seed=12) != expected


def test_identical_runs_differ_by_zero_with_an_interval_around_zero():
    scores = np.random.default_rng(0).random(200)
    result = paired_bootstrap(scores, scores.copy(), resamples=500, seed=1)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_runs_that_differ_on_known_questions():
    a = np.ones(40)
    b = a.copy()
    b[::4] = 0  # b misses ten questions that a gets right
    result = paired_bootstrap(a, b, resamples=2000, seed=5)
    assert result.difference == pytest.approx(0.25)
    assert 0 < result.low < 0.25 < result.high < 0.5
    # a resample as far from 0.25 as 0.25 is from 0 needs 0 or 20+ of the 40 draws to be misses: (1+0)/2001
    assert result.p_value < 0.01
    swapped = paired_bootstrap(b, a, resamples=2000, seed=5)
    assert (swapped.difference, swapped.low, swapped.high) == pytest.approx(
        (-0.25, -result.high, -result.low)
    )
    assert swapped.p_value == result.p_value


def test_bad_input():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap([1], [1], resamples=0)
    assert agreement(["a", "b", ""], ["a", "c", ""]) == pytest.approx(2 / 3)
