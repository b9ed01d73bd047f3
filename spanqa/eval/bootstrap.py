"""Is a difference between two runs real? A paired bootstrap over the questions both were scored on.

Two runs answer the same n dev questions; a[i] and b[i] are their scores on question i (EM 0/1, F1 in
[0, 1], or means over seeds). The observed difference is mean(a - b). A resample draws n questions with
replacement, the same draw for both runs (that is the pairing: it keeps what makes one question hard for
both), and takes the mean difference over the draw. Over `resamples` draws:

- the 95% interval is the 2.5th and 97.5th percentiles of the resampled differences (numpy's default
  linear interpolation);
- the p-value is two-sided, for "no difference": the bootstrap distribution shifted to centre on 0
  (Efron and Tibshirani's shift), i.e. the share of draws whose difference lies at least as far from the
  observed one as the observed one lies from 0, counted as (1 + hits) / (1 + resamples) so that it is
  never 0 from finitely many draws. Identical runs give p = 1.

Exact and reproducible: the draws are `numpy.random.default_rng(seed).integers(0, n, size=(k, n))` for
consecutive blocks of k <= BLOCK rows (the same stream as one (resamples, n) draw), and comparisons are
made on sums with a tolerance far below one question's weight, so float rounding cannot flip a hit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BLOCK = 1000  # resamples drawn at a time: memory is BLOCK x n indices
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Bootstrap:
    difference: float  # observed mean(a - b)
    low: float  # the interval's ends
    high: float
    p_value: float
    questions: int
    resamples: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def resample_indices(n: int, resamples: int, seed: int, block: int = BLOCK):
    """The draws, block by block: arrays of shape (k, n) of question indices."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, block):
        yield rng.integers(0, n, size=(min(block, resamples - start), n))


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0, block: int = BLOCK) -> Bootstrap:
    """The paired bootstrap of mean(a - b) (see the module docstring)."""
    a, b = _paired(a, b)
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    sums = np.concatenate(
        [_resampled_sums(a - b, idx) for idx in resample_indices(len(a), resamples, seed, block)]
    )
    return _summarize(a - b, sums, seed)


def bootstrap_from_indices(a, b, indices, seed: int = -1) -> Bootstrap:
    """The same figures from explicit draws (rows of question indices): for checking by hand."""
    a, b = _paired(a, b)
    return _summarize(a - b, _resampled_sums(a - b, np.asarray(indices)), seed)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired scores need two equal, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    return a, b


def _resampled_sums(diff: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return diff[indices].sum(axis=1)


def _summarize(diff: np.ndarray, sums: np.ndarray, seed: int) -> Bootstrap:
    n = len(diff)
    observed = float(diff.sum())
    # |resampled - observed| >= |observed - 0|, on sums; EM sums are whole numbers, so a tolerance of
    # 1e-9 questions cannot change a verdict that exact arithmetic would give
    hits = int(np.count_nonzero(np.abs(sums - observed) >= abs(observed) - 1e-9))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(sums / n, [tail, 100 - tail])
    return Bootstrap(
        difference=observed / n,
        low=float(low),
        high=float(high),
        p_value=(1 + hits) / (1 + len(sums)),
        questions=n,
        resamples=len(sums),
        seed=seed,
    )


def agreement(answers_a: list[str], answers_b: list[str]) -> float:
    """The share of questions on which two runs give the same answer (already normalised)."""
    if len(answers_a) != len(answers_b) or not answers_a:
        raise ValueError("agreement needs two equal, non-empty answer lists")
    return sum(x == y for x, y in zip(answers_a, answers_b, strict=True)) / len(answers_a)
