"""Evaluation during training: every rank infers its share of the dev windows, rank 0 selects the
answers, scores them with the official metric of the dev file (SQuAD v2.0, v1.1 or MRQA) and writes
OUTPUT_DIR/eval/."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from spanqa.eval.candidates import WindowCandidates
from spanqa.eval.evaluate import write_prediction_files
from spanqa.eval.infer import Inferred, infer_candidates
from spanqa.eval.postprocess import select_answers
from spanqa.eval.scoring import score_predictions
from spanqa.train.data import TrainData
from spanqa.train.distributed import broadcast_from_main, gather_to_main
from spanqa.train.progress import bar

log = logging.getLogger("spanqa.train")
EVAL_DIR = "eval"


class Evaluator:
    def __init__(self, data: TrainData, output_dir: Path):
        self.data, self.output_dir = data, output_dir
        self.config, self.env = data.config, data.env

    def evaluate(self, forward, model, step: int, epoch: float) -> dict:
        """The scores of the model now (on every rank). `forward` runs a batch (the DeepSpeed engine),
        `model` is the QAModel it wraps."""
        started = time.perf_counter()
        answers = self.config.answers
        loader = self.data.eval_loader()
        windows = sum(len(b) for b in loader.batch_sampler)  # this rank's share
        with bar(windows, "eval", self.env.is_main, unit="window") as progress:
            mine = infer_candidates(
                forward,
                model,
                loader,
                self.env.device,
                answers.n_best_size,
                answers.max_answer_length,
                with_loss=True,
                progress=progress,
            )
        gathered = gather_to_main(mine, self.env)
        scores = None
        if self.env.is_main:
            scores = self._score(gathered, step, epoch, time.perf_counter() - started)
        return broadcast_from_main(scores, self.env)

    def _score(self, gathered: list[Inferred], step: int, epoch: float, seconds: float) -> dict:
        threshold = self.config.answers.null_threshold
        cands = WindowCandidates.concatenate([g.candidates for g in gathered])
        indices = [i for g in gathered for i in g.window_indices.tolist()]
        predictions, null_odds = select_answers(cands, indices, self.data.dev_store, threshold)
        scores = score_predictions(self.data.golds, predictions, null_odds, threshold, self.data.dev_metric)
        scores["eval_loss"] = sum(g.loss_sum for g in gathered) / max(1, len(indices))
        report = {
            **scores,
            "step": step,
            "epoch": epoch,
            "head": self.config.head,
            "eval_seconds": round(seconds, 3),
        }
        write_prediction_files(self.output_dir / EVAL_DIR, predictions, null_odds, report)
        log.info(
            f"eval at step {step} (epoch {epoch:.2f}): exact {scores['exact']:.2f} f1 {scores['f1']:.2f} "
            f"best_f1 {scores.get('best_f1', math.nan):.2f} eval_loss {scores['eval_loss']:.4f} "
            f"({seconds:.1f} s)"
        )
        return scores
