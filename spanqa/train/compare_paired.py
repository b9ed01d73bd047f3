"""The paired half of `spanqa compare`: read each run's last evaluation from MLflow, re-score it per
question on the shared dev file, cut the questions into breakdown buckets with each run's own tokenizer
and windows, and compare (spanqa.train.comparison)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spanqa.data.formats import load_examples
from spanqa.eval.breakdown import question_buckets
from spanqa.io import load_tokenizer
from spanqa.train.comparison import compare_entries, entries_by_head, entries_by_run, format_comparison
from spanqa.train.run_evals import RunEval, load_run_eval, shared_golds
from spanqa.train.tracking import bounded_http


def paired_comparison(client: Any, runs: list, args: argparse.Namespace) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp, bounded_http(), no_download_bars():
        golds = shared_golds(client, runs, args.data_file, Path(tmp))
        evals = [load_run_eval(client, run, golds, Path(tmp)) for run in runs]
    examples = load_examples(golds.source).examples
    buckets = run_buckets(
        evals, aligned_golds(golds.questions, evals[0].scores.ids), examples, args.tokenizer
    )
    entries = entries_by_head(evals) if args.tag is not None else entries_by_run(evals)
    result = compare_entries(entries, buckets, args.resamples, args.seed)
    steps = ", ".join(f"{e.label} step {e.step}" for e in evals)
    where = f"the last evaluation each run logged ({steps})\non {golds.source} ({golds.metric})"
    return {**result, "data_file": golds.source, "metric": golds.metric}, format_comparison(result, where)


@contextlib.contextmanager
def no_download_bars() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded artifact on stderr: a dozen small files are not worth
    one (unless the user asked for them)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    unset = name not in os.environ
    if unset:
        os.environ[name] = "false"
    try:
        yield
    finally:
        if unset:
            os.environ.pop(name, None)


def aligned_golds(questions: list, ids: list[str]) -> list:
    """The gold question behind each scored id (the v2.0 and MRQA scorers keep an id's last answers)."""
    if [q.id for q in questions] == ids:
        return questions
    by_id = {q.id: q for q in questions}
    return [by_id[qid] for qid in ids]


def run_buckets(evals: list[RunEval], golds: list, examples: list, tokenizer: str | None) -> dict[str, dict]:
    """{run id: its questions' buckets}; runs with the same tokenizer and windows share one cut."""
    cache: dict[tuple, dict] = {}
    out = {}
    for run in evals:
        key = (tokenizer or run.model, tuple(run.windows.as_dict().values()))
        if key not in cache:
            flag = "--tokenizer" if tokenizer else f"run {run.run_id[:8]}'s --model (or give --tokenizer)"
            cache[key] = question_buckets(golds, examples, load_tokenizer(key[0], flag=flag), run.windows)
        out[run.run_id] = cache[key]
    return out
