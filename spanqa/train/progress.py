"""What a person watching a run sees: rank-prefixed log lines and progress bars that never mix.

Log lines go through tqdm's writer, so a line never glues onto a bar that is being drawn. Rank 0 says
what happens; the other ranks only warn. Where stderr is not a terminal, a bar is a progress line
logged every half minute (spanqa.progress).
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from spanqa.progress import ProgressLines, progress_bar

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


def bar(total: int, desc: str, enabled: bool, unit: str = "it", initial: int = 0) -> tqdm | ProgressLines:
    """Rank 0's bar (spanqa.progress), its lines logged with the rank prefix where stderr is a file."""
    return progress_bar(total, desc, enabled, unit, initial, write=log.info)
