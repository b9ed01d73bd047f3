"""What a run records about itself once, at its start: config, DeepSpeed config, world, versions, commit."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "mlflow", "numpy", "spanqa")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the spanqa checkout, when it is one."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_params(trainer) -> dict:
    """The params of a run's MLflow run (nested; the tracker flattens them)."""
    return {
        "config": trainer.config.to_dict(),
        "deepspeed": trainer.ds_config,
        "world_size": trainer.env.world_size,
        "device": trainer.env.device.type,
        "versions": package_versions(),
        "git_commit": git_commit() or "none",
        "train_windows": len(trainer.data.train_store),
        "steps_per_epoch": trainer.schedule.steps_per_epoch,
        "total_steps": trainer.schedule.total_steps,
    }
