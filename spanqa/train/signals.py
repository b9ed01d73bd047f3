"""Signals: what stops a run cleanly. A stop request is a flag the trainer checks at step boundaries
together with the other ranks; then every rank saves a checkpoint and the run ends.

- SIGUSR1 (SLURM's `--signal=USR1@T`, `scancel --signal=USR1 --batch`): save, then requeue the job.
- SIGTERM (`scancel`, a requeue, a preemption by another job) and SIGINT (Ctrl-C): save and stay ended;
  a second Ctrl-C ends the process at once.
- The launcher's death (SIGTERM to `deepspeed` ends it in a moment, while its ranks would run on): each
  rank watches the launcher's processes and stops as on SIGTERM when one is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


class PreemptionFlag:
    """The stop flag (see the module docstring); only SIGUSR1 asks for the job to be requeued: SIGTERM
    and SIGINT mean the job is being ended, and it must stay ended.

    Install it for the life of the process: after `scontrol requeue` SLURM SIGTERMs every task, and
    a default handler then would kill the ranks while they still close the MLflow run.
    """

    REQUEUE_SIGNAL = signal.SIGUSR1

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.received: set[int] = set()
        self.armed = False  # training has begun: from now on a stop saves a checkpoint first
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            os._exit(130)  # the second Ctrl-C: the user does not want to wait for the checkpoint
        if not self.armed and signum != self.REQUEUE_SIGNAL:
            raise SystemExit(128 + signum)  # nothing trained yet, nothing to save: stop now, quietly
        self.received.add(signum)

    @property
    def is_set(self) -> bool:
        return bool(self.received)

    @property
    def wants_requeue(self) -> bool:
        return self.REQUEUE_SIGNAL in self.received

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def slurm_job_to_requeue(environ: dict | None = None) -> str | None:
    """The job id `scontrol requeue` wants: ARRAYJOB_TASK for array tasks, else the job id; None
    outside SLURM."""
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job: str) -> str:
    """Ask SLURM to run this job again (it resumes from the checkpoint just saved); the outcome as text."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job} failed: {err}"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return f"scontrol requeue {job}: done"


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): tells a live process from a new one that
    took its pid. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_processes() -> list[tuple[int, str]]:
    """(pid, start time) of the processes that launched this rank: the parent, and when that is
    DeepSpeed's per-node launch.py, the `deepspeed` command above it as well."""
    parent = os.getppid()
    chain = [parent]
    if "deepspeed.launcher.launch" in _cmdline(parent):
        grandparent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
        chain.append(grandparent)
    return [(pid, start) for pid in chain if pid > 1 and (start := _start_time(pid)) is not None]


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """Under a launcher (Linux), send this process SIGTERM when a launcher process is gone, so that it
    saves and stops instead of running on unseen. Returns the watching thread (a daemon)."""
    if not Path("/proc/self/stat").exists() or "LOCAL_RANK" not in os.environ:
        return None
    watched = launcher_processes()

    def watch() -> None:
        while all(_start_time(pid) == start for pid, start in watched):
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="spanqa-launcher-watch", daemon=True)
    thread.start()
    return thread
