"""`spanqa prepare`: SQuAD JSON or MRQA JSON lines -> window store, reused when built from the same inputs.

spanqa prepare --data_file dev-v2.0.json --tokenizer SpanBERT/spanbert-base-cased --out prepared/dev
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from spanqa import flags, io
from spanqa.data import stats
from spanqa.data.formats import load_examples
from spanqa.data.store import FORMAT_VERSION, META, STATS_DIR, WindowStore, build_meta, write_store
from spanqa.data.windows import WindowSettings, build_windows, pair_template, tokenizer_fingerprint
from spanqa.errors import SpanqaError


def prepare(
    data_file: str | Path,
    tokenizer: Any,
    out_dir: str | Path,
    settings: WindowSettings = WindowSettings(),  # noqa: B008 - frozen, so one shared default is safe
    progress: bool = True,
    out_flag: str = "--out",
) -> WindowStore:
    """Build (or reuse) the window store of `data_file` at `out_dir`.

    `tokenizer` is a fast Hugging Face tokenizer or a name/path to load one from. An existing store is
    reused only when its meta.json records the same source sha256, tokenizer fingerprint, window
    settings and format version; otherwise it is rebuilt and replaced atomically. With `progress`,
    shows progress bars and prints the summary (counts, repairs, drops) to stderr at the end.
    In data-parallel jobs call it on one rank and let the others wait, then open the store.
    `out_flag` names `out_dir` in errors (training prepares into --cache_dir).
    """
    data_file, out_dir = Path(data_file), Path(out_dir)
    tokenizer, tokenizer_name = _as_tokenizer(tokenizer)
    settings.validate(pair_template(tokenizer).n_special)
    wanted = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings.as_dict(),
        "source_sha256": file_sha256(data_file),
    }
    _refuse_foreign_dir(out_dir, out_flag)
    existing = reusable_store(out_dir, wanted)
    if existing is not None:
        _say(progress, summary(existing))
        return existing
    io.check_writable_dir(out_dir, out_flag)  # before minutes of tokenizing, not after
    with io.writing(out_flag, out_dir):
        build_store(data_file, tokenizer, tokenizer_name, out_dir, settings, wanted, progress)
    store = WindowStore.open(out_dir)
    _say(progress, summary(store))
    return store


def build_store(data_file, tokenizer, tokenizer_name, out_dir, settings, wanted, progress) -> None:
    """Parse, validate and cut `data_file` into windows; write the store with its length statistics."""
    started = time.perf_counter()
    loaded = load_examples(data_file)
    examples, report = loaded.examples, loaded.report
    if not examples:
        raise SpanqaError(f"{data_file}: data: no questions with a usable answer or is_impossible")
    arrays = build_windows(examples, tokenizer, settings, progress=progress)
    template = pair_template(tokenizer)
    meta = build_meta(
        arrays,
        len(examples),
        tokenizer={
            "name_or_path": tokenizer_name,
            "fingerprint": wanted["tokenizer"],
            "vocab_size": len(tokenizer),
            "second_type_id": template.second_type_id,
            "n_special": template.n_special,
        },
        settings=settings.as_dict(),
        source={
            "path": str(data_file.resolve()),
            "sha256": wanted["source_sha256"],
            "format": loaded.format,
            "metric": loaded.metric,
        },
        validation=report,
    )
    meta["prepare_seconds"] = round(time.perf_counter() - started, 3)

    def write_stats(store_dir: Path) -> None:  # inside the store: training logs them with the run
        windows = np.bincount(arrays.example_index, minlength=len(examples))
        raw = stats.distributions(examples, tokenizer, settings, windows)
        stats.write(raw, data_file, store_dir / STATS_DIR)

    def same_inputs(store_dir: Path) -> bool:  # several jobs sharing one cache build it at once
        return reusable_store(store_dir, wanted) is not None

    write_store(out_dir, arrays, examples, meta, extra=write_stats, keep_theirs=same_inputs)


def reusable_store(out_dir: Path, wanted: dict) -> WindowStore | None:
    """The store at `out_dir` when it opens cleanly and was built from the `wanted` inputs, else None."""
    if not (out_dir / META).is_file():
        return None
    try:
        store = WindowStore.open(out_dir)
    except SpanqaError:
        return None  # partial, corrupt or another version: rebuild it
    meta = store.meta
    found = {
        "format_version": meta["format_version"],
        "tokenizer": meta["tokenizer"].get("fingerprint"),
        "settings": meta["settings"],
        "source_sha256": meta["source"].get("sha256"),
    }
    if found != wanted or "metric" not in meta["source"]:
        return None  # other inputs, or a store older than its source's format and scorer being recorded
    store.reused = True
    return store


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise SpanqaError(f"{path}: no such file") from None
    except OSError as err:
        raise SpanqaError(f"{path}: cannot read: {err.strerror}") from None
    return digest.hexdigest()


def _as_tokenizer(tokenizer: Any) -> tuple[Any, str]:
    if isinstance(tokenizer, (str, Path)):
        return io.load_tokenizer(tokenizer), str(tokenizer)
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if not getattr(tokenizer, "is_fast", False):
        raise SpanqaError(
            f"--tokenizer: {name!r} is not a fast tokenizer (character offsets need a tokenizer.json backend)"
        )
    return tokenizer, name


def _refuse_foreign_dir(out_dir: Path, flag: str) -> None:
    # never replace a directory that is not a window store: it may hold the user's other files
    if out_dir.exists() and not out_dir.is_dir():
        raise SpanqaError(f"{flag}: {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META).is_file():
        raise SpanqaError(f"{flag}: {out_dir} exists, is not empty and is not a window store")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)


def summary(store: WindowStore) -> str:
    meta = store.meta
    v, c = meta["validation"], meta["counts"]
    lines = [
        f"window store: {store.path}"
        + (" (reused: same source, tokenizer, settings and format)" if store.reused else ""),
        f"  questions {v['questions']:,} ({v['answerable']:,} answerable, {v['impossible']:,} unanswerable); "
        f"{v['questions_dropped'] + v['blank_questions_dropped'] + v['blank_context_questions_dropped']:,} "
        f"dropped: {c['examples']:,} examples",
        f"  windows {c['windows']:,} ({c['windows_with_answer']:,} hold their answer), "
        f"tokens {c['tokens']:,}",
        f"  answers {v['answers']:,}: {v['answers_repaired']:,} repaired, {v['answers_dropped']:,} dropped; "
        f"blank questions dropped {v['blank_questions_dropped']:,}, questions of blank contexts dropped "
        f"{v['blank_context_questions_dropped']:,}",
    ]
    lines += [f"  {issue}" for issue in v.get("issues", [])[:10]]
    if len(v.get("issues", [])) > 10:
        lines.append(f"  ... all counted above; the first {len(v['issues'])} are listed in meta.json")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="spanqa prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_file",
        required=True,
        help="SQuAD v1.1/v2.0 JSON or MRQA JSON lines (.jsonl.gz), told by content",
    )
    parser.add_argument("--tokenizer", required=True, help="fast tokenizer: local directory or hub name")
    parser.add_argument("--out", required=True, help="directory of the window store")
    flags.add_flags(parser, WindowSettings)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    store = prepare(
        args.data_file, args.tokenizer, args.out, flags.build_given(WindowSettings, args), progress=progress
    )
    if not progress:  # else prepare() has printed it
        print(summary(store))
    return 0
