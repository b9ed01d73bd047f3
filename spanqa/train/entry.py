"""`spanqa train ...`: train in this process, or as one rank of many under a launcher.

Same flags as `launcher/train.py` and `python -m spanqa.train` (which `deepspeed`, torchrun or srun
start once per GPU). This module imports no torch at import time, so that OMP_NUM_THREADS can still
be set.
"""

from __future__ import annotations

import os
import signal


def default_omp_threads(environ: dict | None = None) -> bool:
    """Set OMP_NUM_THREADS=1 for multi-process runs when the user left it unset (as torchrun does).

    Must run before torch is imported. The deepspeed launcher leaves it unset, and then every rank
    starts one OpenMP thread per core: two CPU ranks on two cores run 3-5x slower per step.
    Returns whether it set the variable.
    """
    environ = os.environ if environ is None else environ
    if int(environ.get("WORLD_SIZE", "1")) > 1 and "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = "1"
        return True
    return False


def quiet_cpu_accelerator() -> None:
    """Without a GPU, tell DeepSpeed its accelerator is the CPU: else every process that imports it
    probes for one and warns "Setting accelerator to CPU"."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str], prog: str = "spanqa train") -> int:
    default_omp_threads()  # before torch is imported below
    quiet_cpu_accelerator()

    from spanqa.config import parse_train_args
    from spanqa.train.distributed import destroy_distributed, init_distributed
    from spanqa.train.signals import PreemptionFlag, watch_launcher
    from spanqa.train.trainer import Trainer

    config = parse_train_args(argv, prog=prog)  # a bad flag stops here: nothing is written
    # Installed until the process ends: a SIGTERM while the run closes (SLURM sends one to every
    # task after `scontrol requeue`) must not kill it before MLflow has the last metrics.
    preemption = PreemptionFlag()
    env = init_distributed()
    watch_launcher()
    try:
        trainer = Trainer(config, env)
        try:
            outcome = trainer.train(preemption)
        except Exception:
            trainer.system_metrics.stop()
            trainer.tracker.close("FAILED")  # what was logged reaches MLflow; the run says it failed
            raise
        stopped_by_signal = outcome in ("preempted", "requeue")
        if stopped_by_signal:
            # Saved; the job is ending. SLURM SIGTERMs every task again (after a requeue, too), and
            # Python puts back the default handler while the interpreter shuts down: SIG_IGN stays,
            # so that a clean exit is not turned into 143 (SLURM still SIGKILLs a hung rank).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        trainer.close("KILLED" if stopped_by_signal else "FINISHED")
        if outcome == "requeue":
            trainer.requeue()
    finally:
        destroy_distributed()
    return 0


def run_script(prog: str) -> None:
    """`launcher/train.py` and `python -m spanqa.train`: main() with a one-line error and exit 2 on
    bad input."""
    import sys

    from spanqa.errors import SpanqaError, report

    try:
        sys.exit(main(sys.argv[1:], prog=prog))
    except SpanqaError as err:
        sys.exit(report(prog, err))
