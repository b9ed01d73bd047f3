"""Rank 0's record of a run: OUTPUT_DIR/train_log.jsonl (one line per logged step and evaluation, the
truth the curves are drawn from), the same records in memory, and each one sent to the MLflow tracker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from spanqa import io

TRAIN_LOG = "train_log.jsonl"


class RunLog:
    def __init__(self, output_dir: Path, tracker, is_main: bool):
        self.path = Path(output_dir) / TRAIN_LOG
        self.tracker, self.is_main = tracker, is_main
        self.history: list[dict] = []

    def resume_at(self, step: int) -> None:
        """Keep the records up to `step` (the checkpoint's); later ones, from an interrupted run, are
        dropped from the file too, because the resumed run logs those steps again."""
        if not self.is_main or not self.path.is_file():
            return
        history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.history = [h for h in history if h["step"] <= step]
        if len(self.history) != len(history):
            io.write_text(self.path, "".join(json.dumps(h) + "\n" for h in self.history))

    def record(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if not self.is_main:
            return
        entry = {"kind": kind, "step": step, **metrics}
        self.history.append(entry)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.tracker.log_metrics(metrics, step=step)


def write_param_checksum(model, output_dir: Path, rank: int, step: int) -> None:
    """Debugging (--log_param_checksum): this rank's parameters, hashed, one line per step."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    folder = Path(output_dir) / "param_checksums"
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "sha256": digest.hexdigest()}) + "\n")
