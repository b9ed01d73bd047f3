"""Where a run is right and wrong: its EM and F1 broken down by kind of question, as a table and a PNG.

Four ways of sorting the dev questions into buckets:
- question word: the first of what/who/when/where/which/how/why among the question's words (whom and
  whose count as who), else other;
- answer tokens: the length of the first gold answer in the model's own tokens (none: unanswerable);
- windows: how many windows the model's window settings cut the question's context into;
- answerable: HasAns / NoAns, as the official SQuAD v2 script splits them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spanqa import io
from spanqa.data.squad import Example
from spanqa.data.windows import WindowSettings, build_windows, quiet_transformers
from spanqa.eval.golds import GoldQuestion

QUESTION_WORDS = ("what", "who", "when", "where", "which", "how", "why")
_ALIASES = {"whom": "who", "whose": "who"}
_WORDS = re.compile(r"[a-z]+")
ANSWER_TOKEN_BUCKETS = ((1, "1"), (2, "2"), (3, "3"), (5, "4-5"), (10, "6-10"), (None, "11+"))
WINDOW_BUCKETS = ((1, "1"), (2, "2"), (3, "3"), (5, "4-5"), (None, "6+"))
DIMENSIONS = {
    "question word": (*QUESTION_WORDS, "other"),
    "answer tokens": ("none", *(name for _, name in ANSWER_TOKEN_BUCKETS)),
    "windows": tuple(name for _, name in WINDOW_BUCKETS),
    "answerable": ("HasAns", "NoAns"),
}
UNKNOWN = "unknown"  # a question the training-side parser dropped (no valid answer): no windows to count


def question_word(question: str) -> str:
    for word in _WORDS.findall(question.lower()):
        word = _ALIASES.get(word, word)
        if word in QUESTION_WORDS:
            return word
    return "other"


def bucket(value: int, buckets: tuple) -> str:
    for upper, name in buckets:
        if upper is None or value <= upper:
            return name
    raise AssertionError("the last bucket is open")


def question_buckets(
    golds: list[GoldQuestion], examples: list[Example], tokenizer: Any, settings: WindowSettings
) -> dict[str, list[str]]:
    """{dimension: the bucket of each of `golds`, in order}. `examples` are the dev file's validated
    examples (their questions and contexts); windows are cut as training cuts them."""
    windows = np.bincount(build_windows(examples, tokenizer, settings).example_index, minlength=len(examples))
    by_id = {ex.id: (ex, int(n)) for ex, n in zip(examples, windows, strict=True)}
    firsts = [g.answers[0] for g in golds if g.answers]
    with quiet_transformers():
        lengths = (
            iter(len(ids) for ids in tokenizer(firsts, add_special_tokens=False)["input_ids"])
            if firsts
            else iter(())
        )
    out: dict[str, list[str]] = {name: [] for name in DIMENSIONS}
    for gold in golds:
        example, n_windows = by_id.get(gold.id, (None, 0))
        out["question word"].append(question_word(example.question) if example else UNKNOWN)
        out["answer tokens"].append(bucket(next(lengths), ANSWER_TOKEN_BUCKETS) if gold.answers else "none")
        out["windows"].append(bucket(n_windows, WINDOW_BUCKETS) if example else UNKNOWN)
        out["answerable"].append("HasAns" if gold.has_answer else "NoAns")
    return out


def breakdown(buckets: Mapping[str, list[str]], exact: np.ndarray, f1: np.ndarray) -> dict:
    """{dimension: {bucket: {"n", "exact", "f1"}}} (scores in %), buckets in DIMENSIONS order, empty ones
    left out."""
    out = {}
    for dimension, names in buckets.items():
        names = np.asarray(names)
        rows = {}
        for name in (*DIMENSIONS[dimension], UNKNOWN):
            chosen = names == name
            if chosen.any():
                rows[name] = {
                    "n": int(chosen.sum()),
                    "exact": 100 * float(exact[chosen].mean()),
                    "f1": 100 * float(f1[chosen].mean()),
                }
        out[dimension] = rows
    return out


def column_label(label: str, width: int = 18) -> str:
    """A run's name cut to its column: its end kept, where names that share a prefix differ
    ("bench/accuracy.py crf" and "bench/accuracy.py span")."""
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def format_breakdowns(by_run: Mapping[str, dict]) -> str:
    """One table per dimension: a row per bucket, its question count, then EM / F1 for each run."""
    labels = list(by_run)
    first = by_run[labels[0]]
    lines = []
    for dimension in first:
        columns = "".join(f"  {column_label(label):>18}" for label in labels)
        lines += ["", f"{dimension:<14}{'n':>6}{columns}"]
        for name, row in first[dimension].items():
            cells = [by_run[label][dimension][name] for label in labels]
            figures = "".join(f"  {cell['exact']:>10.1f} /{cell['f1']:>5.1f}" for cell in cells)
            lines.append(f"{name:<14}{row['n']:>6}{figures}")
    return "\n".join(lines[1:])


def plot_breakdowns(by_run: Mapping[str, dict], out_png: str | os.PathLike) -> Path:
    """F1 per bucket, a bar per run, one panel per dimension; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dimensions = list(next(iter(by_run.values())))
    figure = Figure(figsize=(4.2 * len(dimensions), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(dimensions), squeeze=False)[0]
    width = 0.8 / len(by_run)
    for ax, dimension in zip(axes, dimensions, strict=True):
        names = list(next(iter(by_run.values()))[dimension])
        x = np.arange(len(names))
        for k, (label, result) in enumerate(by_run.items()):
            ax.bar(
                x + (k - (len(by_run) - 1) / 2) * width,
                [result[dimension][n]["f1"] for n in names],
                width,
                label=label,
            )
        counts = next(iter(by_run.values()))[dimension]
        ax.set_xticks(x, [f"{n}\n({counts[n]['n']})" for n in names], fontsize=8)
        ax.set_title(f"F1 by {dimension}")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("F1 (%)  [questions per bucket below]")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    out_png = Path(out_png)
    with io.atomic_file(out_png, binary=True) as f:
        figure.savefig(f, format="png")
    return out_png
