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
        """Figures at the configured threshold, the best ones over all thresholds, and (when the threshold
        is tuned) the full figures at the tuned one; eval/ gets the answers at the model's threshold."""
        answers = self.config.answers
        cands = WindowCandidates.concatenate([g.candidates for g in gathered])
        indices = [i for g in gathered for i in g.window_indices.tolist()]
        # every question's best non-null answer: the SQuAD v2 metric applies the thresholds itself, so
        # that the best-threshold sweep sees answers for thresholds above the configured one too (the
        # v1.1 and MRQA scripts never predict "no answer": their threshold is +inf)
        best_spans, null_odds = select_answers(cands, indices, self.data.dev_store, math.inf)
        scores = score_predictions(
            self.data.golds, best_spans, null_odds, answers.null_threshold, self.data.dev_metric
        )
        scores["eval_loss"] = sum(g.loss_sum for g in gathered) / max(1, len(indices))
        threshold = self.model_threshold(scores)
        if threshold != answers.null_threshold:
            tuned = score_predictions(self.data.golds, best_spans, null_odds, threshold, self.data.dev_metric)
            scores.update({f"tuned_{k}": v for k, v in tuned.items() if k in TUNED_FIGURES})
            scores["tuned_threshold"] = threshold
        predictions = {qid: "" if null_odds[qid] > threshold else text for qid, text in best_spans.items()}
        report = {
            **scores,
            "step": step,
            "epoch": epoch,
            "head": self.config.head,
            "eval_seconds": round(seconds, 3),
        }
        write_prediction_files(self.output_dir / EVAL_DIR, predictions, null_odds, report)
        log.info(eval_line(scores, step, epoch, seconds))
        return scores

    def model_threshold(self, scores: dict) -> float:
        """The null threshold the exported model answers with: the one given, else the one that reached
        the best --eval_metric on dev when that is a best_* metric (SpanBERT's recipe), else 0."""
        answers, metric = self.config.answers, self.config.eval_metric
        if answers.null_score_diff_threshold is not None or not answers.version_2_with_negative:
            return answers.null_threshold
        return float(scores.get(f"{metric}_thresh", 0.0)) if metric.startswith("best_") else 0.0


TUNED_FIGURES = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1")


def eval_line(scores: dict, step: int, epoch: float, seconds: float) -> str:
    line = f"eval at step {step} (epoch {epoch:.2f}): exact {scores['exact']:.2f} f1 {scores['f1']:.2f}"
    for key in ("HasAns_f1", "NoAns_f1", "best_f1"):
        if key in scores:
            line += f" {key} {scores[key]:.2f}"
    if "tuned_threshold" in scores:
        line += f" (at the tuned threshold {scores['tuned_threshold']:.3f}: f1 {scores['tuned_f1']:.2f})"
    return line + f" eval_loss {scores['eval_loss']:.4f} ({seconds:.1f} s)"
