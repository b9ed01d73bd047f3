"""`spanqa stats`: length distributions of a SQuAD/MRQA file or a window store, as JSON and PNG histograms.

    spanqa stats dev-v2.0.json --tokenizer DIR --out stats/dev     # a SQuAD file (tokenized in memory)
    spanqa stats TriviaQA-dev.jsonl.gz --tokenizer DIR --max_seq_length 512 --out stats/triviaqa  # MRQA
    spanqa stats prepared/dev --out stats/dev                       # a window store (its own tokenizer)

Writes stats.json (summary and histogram of each distribution) and question_length.png,
context_length.png, windows_per_example.png: the question/context length figures of the reference
report, for any dataset. Question lengths are counted before the max_query_length cut, context lengths
once per distinct context (paragraph). Windows per question is the figure that says what a dataset costs
at a window setting: MRQA's long contexts (TriviaQA, SearchQA) are cut into several windows each.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from spanqa import flags, io
from spanqa.data.formats import load_examples
from spanqa.data.squad import Example
from spanqa.data.store import WindowStore
from spanqa.data.windows import WindowSettings, build_windows, quiet_transformers
from spanqa.errors import SpanqaError
from spanqa.io import load_tokenizer

PLOTS = {
    "question_length.png": ("question_tokens", "question_words", "Question length"),
    "context_length.png": ("context_tokens", "context_words", "Context length"),
}


def collect(source: Path, tokenizer_name: str | None, settings: WindowSettings) -> dict[str, Any]:
    """The raw distributions (numpy arrays) of a SQuAD file or a window store."""
    if source.is_dir():
        store = WindowStore.open(source)
        examples = store.examples()
        tokenizer = load_tokenizer(tokenizer_name or store.meta["tokenizer"]["name_or_path"])
        windows = np.bincount(store.example_index, minlength=len(examples))
        settings = WindowSettings(**store.meta["settings"])
    else:
        if tokenizer_name is None:
            raise SpanqaError("--tokenizer: needed to count the tokens of a SQuAD file")
        examples = load_examples(source).examples
        tokenizer = load_tokenizer(tokenizer_name)
        arrays = build_windows(examples, tokenizer, settings)
        windows = np.bincount(arrays.example_index, minlength=len(examples))
    return distributions(examples, tokenizer, settings, windows)


def distributions(
    examples: list[Example], tokenizer: Any, settings: WindowSettings, windows_per_example: np.ndarray
) -> dict[str, Any]:
    """The raw distributions (numpy arrays) of `examples` cut into windows as `windows_per_example` says."""
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    return {
        "settings": settings,
        "examples": examples,
        "question_tokens": _token_counts(tokenizer, [ex.question for ex in examples]),
        "question_words": _word_counts([ex.question for ex in examples]),
        "context_tokens": _token_counts(tokenizer, contexts),
        "context_words": _word_counts(contexts),
        "windows_per_example": np.asarray(windows_per_example),
    }


def _token_counts(tokenizer: Any, texts: list[str]) -> np.ndarray:
    with quiet_transformers():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((len(x) for x in ids), np.int64, len(ids))


def _word_counts(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(t.split()) for t in texts), np.int64, len(texts))


def summarize(values: np.ndarray) -> dict[str, Any]:
    counts, edges = np.histogram(values, bins=min(50, max(1, int(values.max() - values.min()) + 1)))
    percentiles = {f"p{p}": float(np.percentile(values, p)) for p in (50, 90, 95, 99)}
    return {
        "count": int(len(values)),
        "mean": round(float(values.mean()), 3),
        "std": round(float(values.std()), 3),
        "min": int(values.min()),
        "max": int(values.max()),
        **percentiles,
        "histogram": {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()},
    }


def report(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    settings: WindowSettings = raw["settings"]
    examples: list[Example] = raw["examples"]
    names = ("question_tokens", "question_words", "context_tokens", "context_words", "windows_per_example")
    return {
        "source": str(source),
        "settings": settings.as_dict(),
        "examples": len(examples),
        "answerable": sum(not ex.is_impossible for ex in examples),
        "contexts": len(raw["context_tokens"]),
        "windows": int(raw["windows_per_example"].sum()),
        "questions_over_max_query_length": int((raw["question_tokens"] > settings.max_query_length).sum()),
        "examples_with_several_windows": int((raw["windows_per_example"] > 1).sum()),
        "distributions": {name: summarize(raw[name]) for name in names},
    }


def write(raw: dict[str, Any], source: Path, out_dir: Path) -> dict[str, Any]:
    """stats.json and the PNG histograms into `out_dir`; the report."""
    result = report(raw, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(out_dir / "stats.json", result)
    plot(raw, out_dir)
    return result


def plot(raw: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    settings: WindowSettings = raw["settings"]
    limits = {
        "question_tokens": ("max_query_length", settings.max_query_length),
        "context_tokens": ("max_seq_length", settings.max_seq_length),
    }
    written = []
    for file, (tokens, words, title) in PLOTS.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, name, unit in ((axes[0], tokens, "tokens"), (axes[1], words, "words")):
            ax.hist(raw[name], bins=50, color="#4477aa")
            ax.set_xlabel(f"{unit}")
            ax.set_ylabel("count")
            ax.set_title(f"{title} in {unit}")
            if name in limits:
                label, limit = limits[name]
                ax.axvline(limit, color="#cc3311", linestyle="--", label=f"{label} {limit}")
                ax.legend()
        fig.tight_layout()
        written.append(_save_png(fig, out_dir / file))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    counts = np.bincount(raw["windows_per_example"])
    ax.bar(np.arange(len(counts)), counts, color="#4477aa")
    ax.set_xlabel(f"windows per example ({settings.max_seq_length}/{settings.doc_overlap})")
    ax.set_ylabel("examples")
    fig.tight_layout()
    written.append(_save_png(fig, out_dir / "windows_per_example.png"))
    plt.close(fig)
    return written


def _save_png(fig, path: Path) -> Path:
    with io.atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def windows_line(result: dict[str, Any]) -> str:
    """The windows-per-question figure: mean, spread and the share of questions cut into several."""
    d, s = result["distributions"]["windows_per_example"], result["settings"]
    several = result["examples_with_several_windows"] / max(1, result["examples"])
    # windows are given by their overlap or (run_squad.py's way) by the step between their starts
    cut = f"overlap {s['doc_overlap']}" if s.get("doc_overlap") is not None else f"stride {s['doc_stride']}"
    return (
        f"windows per question at {s['max_seq_length']} tokens, {cut}: mean {d['mean']:.2f}, "
        f"p50 {d['p50']:.0f}, p99 {d['p99']:.0f}, max {d['max']} ({result['windows']:,} windows for "
        f"{result['examples']:,} questions; {100 * several:.1f}% of questions have several)"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spanqa stats", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", help="a SQuAD JSON file, an MRQA JSON-lines file or a window store directory"
    )
    parser.add_argument("--out", required=True, help="directory for stats.json and the PNG histograms")
    parser.add_argument("--tokenizer", help="fast tokenizer (default for a store: the one it was made with)")
    flags.add_flags(parser, WindowSettings)  # the windows of a SQuAD file
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    source, out_dir = Path(args.source), Path(args.out)
    if not source.exists():
        raise SpanqaError(f"{source}: no such file or window store")
    if out_dir.exists() and not out_dir.is_dir():
        raise SpanqaError(f"--out: {out_dir} exists and is not a directory")
    raw = collect(source, args.tokenizer, flags.build_given(WindowSettings, args))
    result = write(raw, source, out_dir)
    for name, d in result["distributions"].items():
        print(
            f"{name:<19} mean {d['mean']:>7.1f} p50 {d['p50']:>6.0f}  p99 {d['p99']:>6.0f}  max {d['max']:>6}"
        )
    print(windows_line(result))
    print(f"wrote {out_dir / 'stats.json'} and {len(PLOTS) + 1} PNG histograms")
    return 0
