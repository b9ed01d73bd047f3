"""The head-independent currency between answer heads and answer selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowCandidates:
    """Top answer candidates of each window, on one scale so that windows and the null answer compare.

    The span head scores a span as start + end logit and the null answer as the CLS score; the CRF head
    as log p(span) and log p(all O). Selection (`spanqa.eval.postprocess.select_answers`) never needs to
    know which head produced them.
    """

    scores: np.ndarray  # float32 [n_windows, k]; -inf where a window has fewer than k candidates
    starts: np.ndarray  # int32 [n_windows, k]; token index inside the window
    ends: np.ndarray  # int32 [n_windows, k]; inclusive
    null_scores: np.ndarray  # float32 [n_windows]

    def __post_init__(self) -> None:
        n, k = self.scores.shape
        if self.starts.shape != (n, k) or self.ends.shape != (n, k) or self.null_scores.shape != (n,):
            raise ValueError(
                f"candidate arrays disagree: scores {self.scores.shape}, starts {self.starts.shape}, "
                f"ends {self.ends.shape}, null_scores {self.null_scores.shape}"
            )

    @staticmethod
    def concatenate(parts: list[WindowCandidates]) -> WindowCandidates:
        """Join per-batch candidates (same k) into one set, in order."""
        return WindowCandidates(
            scores=np.concatenate([p.scores for p in parts]),
            starts=np.concatenate([p.starts for p in parts]),
            ends=np.concatenate([p.ends for p in parts]),
            null_scores=np.concatenate([p.null_scores for p in parts]),
        )
