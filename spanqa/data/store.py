"""The window store: pre-tokenized, labelled windows in flat memory-mapped arrays.

A store is a directory written atomically (a temporary sibling directory, then one rename), so an
interrupted write never leaves something that looks like a store. Arrays are `.npy` files opened with
`np.load(mmap_mode="r")` (an `np.memmap` whose header carries dtype and shape, so a truncated or
foreign file is caught on open); the page cache shares them between all ranks of a node.

Flat arrays, real tokens only (no padding on disk):
  input_ids     uint16 when the vocabulary fits (BERT's 30,522 does: half of int32's disk and page cache),
                else uint32  [total_tokens]
  char_offsets  int32 [total_tokens, 2]: character span of a context token in its context, (-1, -1) on
                question and special tokens; evaluation maps token spans back to text with it
Per window (int16 holds any window position because max_seq_length <= 32767):
  window_starts int64 [n + 1]: window i is tokens window_starts[i]:window_starts[i+1]
  window_lengths, context_start, context_end (inclusive), start_positions, end_positions  int16 [n]
                (positions are 0 = the CLS index when the answer is not wholly inside the window)
  example_index int32 [n]: line of examples.jsonl the window belongs to
examples.jsonl: one example per line (spanqa.data.squad.Example.to_json); meta.json: see `build_meta`.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from spanqa import io
from spanqa.data.squad import Example
from spanqa.data.windows import WindowArrays, WindowSettings
from spanqa.errors import SpanqaError
from spanqa.io import atomic_dir, write_json

FORMAT_VERSION = 3  # 2: no doc_offset array; 3: checksums, window settings with doc_stride/doc_overlap
META = "meta.json"
EXAMPLES = "examples.jsonl"
STATS_DIR = "stats"  # stats.json and the length histograms of `spanqa stats`, made when the store is

# dtype of each array on disk, except input_ids whose dtype depends on the vocabulary size
DTYPES = {
    "char_offsets": "int32",
    "window_starts": "int64",
    "window_lengths": "int16",
    "context_start": "int16",
    "context_end": "int16",
    "start_positions": "int16",
    "end_positions": "int16",
    "example_index": "int32",
}


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


class WindowStore:
    """A window store opened read-only; arrays are memory-mapped and shared through the page cache."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray]):
        self.path = path
        self.meta = meta
        self.input_ids = arrays["input_ids"]
        self.char_offsets = arrays["char_offsets"]
        self.window_starts = arrays["window_starts"]
        self.window_lengths = arrays["window_lengths"]
        self.context_start = arrays["context_start"]
        self.context_end = arrays["context_end"]
        self.start_positions = arrays["start_positions"]
        self.end_positions = arrays["end_positions"]
        self.example_index = arrays["example_index"]
        self.second_type_id = int(meta["tokenizer"]["second_type_id"])
        self.reused = False  # set by prepare(): True when it found this store already built

    @classmethod
    def open(cls, path: str | Path, read_examples: bool = False, verify: bool = True) -> WindowStore:
        """Open and check a store: SpanqaError naming the file if it is partial, corrupt (a checksum, a
        token id past the vocabulary, a label outside its window), another version. `read_examples`:
        read examples.jsonl now too (a dev store: found broken at open, not at the first evaluation).
        `verify=False` skips the checksums (a worker reopening a store its parent has verified)."""
        path = Path(path)
        meta = read_meta(path)
        if verify:
            _check_checksums(path, meta)
        arrays = {name: _open_array(path, name, meta) for name in WindowArrays.ARRAYS}
        _check_consistent(path, meta, arrays)
        store = cls(path, meta, arrays)
        if read_examples:
            store.examples()
        return store

    def check_compatible(
        self, tokenizer: Any = None, settings: WindowSettings | None = None, source_sha256: str | None = None
    ) -> None:
        """SpanqaError naming meta.json when the store was not built with this tokenizer, these window
        settings or this source file (a store given by path, e.g. `--prepared`, may be stale)."""
        from spanqa.data.windows import tokenizer_fingerprint

        meta_file = self.path / META
        if tokenizer is not None:
            theirs, ours = self.meta["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
            if theirs != ours:
                raise SpanqaError(
                    f"{meta_file}: built with another tokenizer (fingerprint {theirs[:12]}, "
                    f"this one is {ours[:12]}): prepare it again"
                )
        if settings is not None and self.meta["settings"] != settings.as_dict():
            raise SpanqaError(
                f"{meta_file}: built with window settings {self.meta['settings']}, not {settings.as_dict()}"
            )
        if source_sha256 is not None and self.meta["source"]["sha256"] != source_sha256:
            raise SpanqaError(
                f"{meta_file}: built from another version of {self.meta['source']['path']} (sha256 differs)"
            )

    def __len__(self) -> int:
        return len(self.window_lengths)

    def window(self, i: int) -> dict[str, Any]:
        """Window i as the loader needs it (input_ids int64, token_type_ids int64, labels as ints)."""
        lo, hi, cs, ce, start, end = self._window_table[i].tolist()
        token_type_ids = np.zeros(hi - lo, np.int64)
        token_type_ids[cs:] = self.second_type_id  # context and its closing special token(s)
        return {
            "input_ids": self._token_ids[lo:hi].astype(np.int64),
            "token_type_ids": token_type_ids,
            "context_start": cs,
            "context_end": ce,
            "start_position": start,
            "end_position": end,
            "index": int(i),
        }

    @cached_property
    def _window_table(self) -> np.ndarray:
        # the per-window fields in one in-memory int64 row per window (48 bytes a window): one read per
        # window instead of six np.memmap indexings, which cost more than the copy of the tokens
        columns = (self.window_starts[:-1], self.window_starts[1:], self.context_start, self.context_end)
        columns += (self.start_positions, self.end_positions)
        return np.stack([np.asarray(c, np.int64) for c in columns], axis=1)

    @cached_property
    def _token_ids(self) -> np.ndarray:
        return self.input_ids.view(np.ndarray)  # same mapped pages, without np.memmap's slicing overhead

    def offsets(self, i: int) -> np.ndarray:
        """int32 [window_length, 2]: character span of each token of window i in its context."""
        return self.char_offsets[self.window_starts[i] : self.window_starts[i + 1]]

    def examples(self) -> list[Example]:
        return self._examples

    @cached_property
    def _examples(self) -> list[Example]:
        with open(self.path / EXAMPLES, encoding="utf-8") as f:
            examples = [Example.from_json(json.loads(line)) for line in f]
        if len(examples) != self.meta["counts"]["examples"]:
            raise SpanqaError(
                f"{self.path / EXAMPLES}: {len(examples)} examples, "
                f"meta.json says {self.meta['counts']['examples']}"
            )
        return examples


def read_meta(path: Path) -> dict:
    meta_file = path / META
    if not path.is_dir():
        raise SpanqaError(f"{path}: not a window store directory")
    if not meta_file.is_file():
        raise SpanqaError(f"{meta_file}: missing (not a window store, or a partial one)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpanqaError(f"{meta_file}: corrupt: {err}") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise SpanqaError(f"{meta_file}: corrupt: no format_version")
    if meta["format_version"] != FORMAT_VERSION:
        raise SpanqaError(
            f"{meta_file}: store format version {meta['format_version']}, this spanqa reads version "
            f"{FORMAT_VERSION}: prepare it again"
        )
    for key in ("counts", "dtypes", "tokenizer", "settings", "source", "checksums"):
        if key not in meta:
            raise SpanqaError(f"{meta_file}: corrupt: missing {key!r}")
    return meta


def _open_array(path: Path, name: str, meta: dict) -> np.ndarray:
    file = path / f"{name}.npy"
    try:
        array = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise SpanqaError(f"{file}: missing (partial window store)") from None
    except (ValueError, OSError, EOFError) as err:
        raise SpanqaError(f"{file}: corrupt: {err}") from None
    if str(array.dtype) != meta["dtypes"].get(name):
        raise SpanqaError(f"{file}: dtype {array.dtype}, meta.json says {meta['dtypes'].get(name)}")
    return array


def _check_checksums(path: Path, meta: dict) -> None:
    for name, crc in meta["checksums"].items():
        file = path / name
        if not file.is_file():
            raise SpanqaError(f"{file}: missing (partial window store)")
        if io.file_crc32(file) != crc:
            raise SpanqaError(
                f"{file}: corrupt: its CRC-32 differs from meta.json's (prepare the store again)"
            )


def _check_consistent(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    n, tokens = meta["counts"]["windows"], meta["counts"]["tokens"]
    expected = {name: (n,) for name in WindowArrays.ARRAYS}
    expected.update(input_ids=(tokens,), char_offsets=(tokens, 2), window_starts=(n + 1,))
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise SpanqaError(
                f"{path / (name + '.npy')}: shape {arrays[name].shape}, expected {shape} from meta.json"
            )
    starts = np.asarray(arrays["window_starts"])
    if n and (starts[0] != 0 or starts[-1] != tokens):
        raise SpanqaError(f"{path / 'window_starts.npy'}: does not cover the {tokens} tokens")
    if not np.array_equal(np.diff(starts), np.asarray(arrays["window_lengths"], np.int64)):
        raise SpanqaError(f"{path / 'window_starts.npy'}: window starts disagree with window_lengths.npy")
    vocab = int(meta["tokenizer"]["vocab_size"])
    if tokens and int(np.asarray(arrays["input_ids"]).max()) >= vocab:
        raise SpanqaError(f"{path / 'input_ids.npy'}: token ids past the tokenizer's vocabulary ({vocab})")
    _check_labels(path, arrays)


def _check_labels(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Every labelled answer lies inside its window's context (training trusts the labels: checking
    them per batch would wait for the device at every step)."""
    start, end = (np.asarray(arrays[k], np.int64) for k in ("start_positions", "end_positions"))
    first, last = (np.asarray(arrays[k], np.int64) for k in ("context_start", "context_end"))
    labelled = start > 0
    bad = np.flatnonzero(
        labelled & ~((first <= start) & (start <= end) & (end <= last)) | (~labelled & (end != 0))
    )
    if len(bad):
        w = int(bad[0])
        raise SpanqaError(
            f"{path / 'start_positions.npy'}: window {w}: answer {start[w]}..{end[w]} is not a span inside "
            f"its context {first[w]}..{last[w]} ({len(bad)} such windows)"
        )


def build_meta(arrays: WindowArrays, n_examples: int, **sections: Any) -> dict:
    """meta.json: format version, counts, dtypes, plus the given sections (tokenizer, settings, ...)."""
    meta = {"format_version": FORMAT_VERSION, **sections}
    meta["counts"] = {
        "examples": n_examples,
        "windows": len(arrays.window_lengths),
        "tokens": len(arrays.input_ids),
        "windows_with_answer": int((arrays.start_positions > 0).sum()),
    }
    meta["dtypes"] = {**DTYPES, "input_ids": token_dtype(sections["tokenizer"]["vocab_size"])}
    return meta


def write_store(
    out_dir: str | Path,
    arrays: WindowArrays,
    examples: list[Example],
    meta: dict,
    extra=None,
    keep_theirs=None,
) -> Path:
    """Write atomically: everything goes to a temporary sibling, which one rename turns into `out_dir`.
    `extra(directory)` adds files of its own first (the length statistics).

    A store already at `out_dir` is replaced only after the new one is complete, and not at all when
    `keep_theirs(out_dir)` accepts it (another job built the same store meanwhile: see `atomic_dir`).
    """
    with atomic_dir(out_dir, keep_theirs=keep_theirs) as tmp:
        for name in WindowArrays.ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(arrays, name).astype(meta["dtypes"][name], copy=False))
        with open(tmp / EXAMPLES, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        if extra is not None:
            extra(tmp)
        files = [f"{name}.npy" for name in WindowArrays.ARRAYS] + [EXAMPLES]
        meta = {**meta, "checksums": {name: io.file_crc32(tmp / name) for name in files}}
        write_json(tmp / META, meta)  # meta.json last: a directory without it is never taken for a store
    return Path(out_dir)
