"""One output directory, one run: a job takes the directory's lock for its whole life, and a fresh run
never joins (or silently replaces) the run a directory already holds.

    OUTPUT_DIR/.lock   flock()ed by rank 0 while the job lives; holds "host pid slurm-job" for the message
                       a second job gets. On NFS v4 flock works across clients; on Lustre only when mounted
                       with `-o flock` (with `localflock` or `noflock` it protects one node at most).
    OUTPUT_DIR/finished written when a run trains to its end: nothing is left to resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from spanqa.errors import SpanqaError

log = logging.getLogger("spanqa.train")
LOCK = ".lock"
FINISHED = "finished"
# What a spanqa run writes into its output directory: the only entries --overwrite_output_dir removes.
RUN_ENTRIES = (
    "checkpoints", "train_log.jsonl", "mlflow_run_id", "mlflow_unlogged.jsonl", "best_model", "eval",
    "training_curves.png", "ds_config.json", "param_checksums", FINISHED,
)  # fmt: skip
# Any of these says a directory holds a run (ds_config.json alone does not: it is written at the start).
RUN_EVIDENCE = ("checkpoints", "train_log.jsonl", "mlflow_run_id", "best_model", FINISHED)


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_EVIDENCE)


def describe_holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"host {socket.gethostname()} pid {os.getpid()}" + (f" SLURM job {job}" if job else "")


class OutputDirLock:
    """An exclusive flock on OUTPUT_DIR/.lock, held until the process ends (or release())."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another job"
            os.close(fd)
            raise SpanqaError(
                f"--output_dir: {self.path.parent} is in use by {holder} (it holds {self.path}); "
                "wait for that job or give another --output_dir"
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning(
                f"{self.path}: this file system does not lock files ({err.strerror}): a second job into "
                f"{self.path.parent} would not be refused"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (describe_holder() + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_fresh_or_resumed(output_dir: Path, resume: str, overwrite: bool) -> None:
    """SpanqaError unless this run may start here: a fresh run needs a directory without a run
    (--overwrite_output_dir removes the old run's entries first); --resume auto needs one to resume."""
    if resume == "none" and holds_run(output_dir):
        if not overwrite:
            raise SpanqaError(
                f"--output_dir: {output_dir} holds a run already; continue it with --resume auto, or start "
                "over with --overwrite_output_dir (removes that run's checkpoints, logs, model, eval files)"
            )
        remove_run(output_dir)
    finished = output_dir / FINISHED
    if resume == "auto" and finished.is_file():
        step = json.loads(finished.read_text()).get("step")
        raise SpanqaError(
            f"--resume auto: the run in {output_dir} finished at step {step} ({finished}): nothing to "
            "resume; start a new run in another --output_dir or with --overwrite_output_dir"
        )


def remove_run(output_dir: Path) -> None:
    """Delete what a spanqa run wrote into `output_dir`, and nothing else."""
    removed = []
    for name in RUN_ENTRIES:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    log.warning(f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {output_dir}")
