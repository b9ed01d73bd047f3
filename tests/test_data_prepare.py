"""`spanqa prepare` and the window store: round trip, reuse, staleness, atomicity, bad input."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
from transformers import AutoTokenizer

from spanqa.cli import main as cli_main
from spanqa.data import store as store_module
from spanqa.data.prepare import prepare
from spanqa.data.squad import load_squad
from spanqa.data.store import WindowStore
from spanqa.data.windows import WindowSettings, build_windows
from spanqa.errors import SpanqaError
from spanqa.io import file_crc32 as crc32
from spanqa.testing import minilm_dir


def test_store_round_trip(tiny_settings, tiny_store, tiny_squad_file, minilm_tokenizer):
    examples, report = load_squad(tiny_squad_file)
    arrays = build_windows(examples, minilm_tokenizer, WindowSettings(**tiny_settings))
    store = WindowStore.open(tiny_store.path)
    assert store.examples() == examples
    for name in arrays.ARRAYS:
        np.testing.assert_array_equal(getattr(store, name), getattr(arrays, name), err_msg=name)
        assert isinstance(getattr(store, name), np.memmap), name
    assert store.input_ids.dtype == np.uint16  # 30,522 ids fit
    meta = store.meta
    assert meta["counts"] == {
        "examples": len(examples),
        "windows": len(arrays.window_lengths),
        "tokens": len(arrays.input_ids),
        "windows_with_answer": int((arrays.start_positions > 0).sum()),
    }
    assert meta["settings"] == WindowSettings(**tiny_settings).as_dict() and meta["validation"] == report
    assert len(meta["tokenizer"]["fingerprint"]) == 64 and len(meta["source"]["sha256"]) == 64
    # more windows than examples: long contexts really were split at 128 tokens
    assert len(store) > len(examples)


def test_window_view(tiny_store, minilm_tokenizer):
    i = int(np.argmax(tiny_store.start_positions))  # a window that holds its answer
    w = tiny_store.window(i)
    n = int(tiny_store.window_lengths[i])
    assert w["input_ids"].dtype == np.int64 and len(w["input_ids"]) == n
    assert w["input_ids"][0] == minilm_tokenizer.cls_token_id
    assert w["input_ids"][w["context_start"] - 1] == w["input_ids"][n - 1] == minilm_tokenizer.sep_token_id
    assert w["context_end"] == n - 2
    assert list(w["token_type_ids"]) == [0] * w["context_start"] + [1] * (n - w["context_start"])
    assert w["context_start"] <= w["start_position"] <= w["end_position"] <= w["context_end"]
    assert w["index"] == i


def test_same_inputs_reuse_the_store(tiny_settings, tmp_path, minilm_tokenizer, tiny_squad_file, monkeypatch):
    out = tmp_path / "store"
    first = prepare(tiny_squad_file, minilm_tokenizer, out, WindowSettings(**tiny_settings), progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a matching store must be reused without tokenizing again")

    monkeypatch.setattr("spanqa.data.prepare.build_windows", no_tokenizing)
    again = prepare(tiny_squad_file, minilm_tokenizer, out, WindowSettings(**tiny_settings), progress=False)
    assert again.meta == first.meta and (out / "meta.json").stat().st_mtime_ns == stamp
    assert again.reused and not first.reused


def test_a_store_another_job_finished_meanwhile_is_kept(
    tiny_settings, tmp_path, minilm_tokenizer, tiny_squad_file, monkeypatch
):
    """Array tasks sharing one cache all build its store at once. The one that finishes last keeps
    the first's store in place (and opens it): swapping it would pull it from under the tasks that
    opened it already (CI: "window_starts.npy: missing (partial window store)")."""
    out, settings = tmp_path / "store", WindowSettings(**tiny_settings)
    real_build = build_windows
    theirs = []

    def other_job_finishes_first(*args, **kwargs):
        if not theirs:
            monkeypatch.setattr("spanqa.data.prepare.build_windows", real_build)
            theirs.append(prepare(tiny_squad_file, minilm_tokenizer, out, settings, progress=False))
            theirs.append(out.stat().st_ino)
        return real_build(*args, **kwargs)

    monkeypatch.setattr("spanqa.data.prepare.build_windows", other_job_finishes_first)
    mine = prepare(tiny_squad_file, minilm_tokenizer, out, settings, progress=False)
    assert out.stat().st_ino == theirs[1] and mine.meta == theirs[0].meta
    np.testing.assert_array_equal(theirs[0].window_starts, mine.window_starts)  # still readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("change", ["settings", "source", "tokenizer", "version", "corrupt"])
def test_other_inputs_rebuild_the_store(tiny_settings, change, tmp_path, minilm_tokenizer, tiny_squad_file):
    out = tmp_path / "store"
    data = tmp_path / "data.json"
    shutil.copy(tiny_squad_file, data)
    first = prepare(data, minilm_tokenizer, out, WindowSettings(**tiny_settings), progress=False)
    settings, tokenizer = dict(tiny_settings), minilm_tokenizer
    if change == "settings":
        settings["doc_overlap"] = 48
    elif change == "source":
        doc = json.loads(data.read_text())
        doc["data"][0]["paragraphs"][0]["qas"][0]["question"] += " really?"
        data.write_text(json.dumps(doc))
    elif change == "tokenizer":  # the same name, another vocabulary
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        tokenizer.add_tokens(["spanqa-new-token"])
    elif change == "version":
        meta = json.loads((out / "meta.json").read_text())
        meta["format_version"] = 0
        (out / "meta.json").write_text(json.dumps(meta))
    elif change == "corrupt":
        (out / "input_ids.npy").write_bytes(b"\x93NUMPY garbage")
    rebuilt = prepare(data, tokenizer, out, WindowSettings(**settings), progress=False)
    assert rebuilt.meta["settings"] == WindowSettings(**settings).as_dict()
    if change == "source":
        assert rebuilt.meta["source"]["sha256"] != first.meta["source"]["sha256"]
        assert rebuilt.examples()[0].question.endswith(" really?")
    if change == "tokenizer":
        assert rebuilt.meta["tokenizer"]["fingerprint"] != first.meta["tokenizer"]["fingerprint"]
        assert rebuilt.meta["tokenizer"]["name_or_path"] == first.meta["tokenizer"]["name_or_path"]
    assert WindowStore.open(out).meta == rebuilt.meta
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_interrupted_write_leaves_no_store(
    tiny_settings, tmp_path, minilm_tokenizer, tiny_squad_file, monkeypatch
):
    out = tmp_path / "store"
    real_save = np.save
    calls = []

    def save_then_die(file, array):
        calls.append(file)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(file, array)

    monkeypatch.setattr(store_module.np, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_squad_file, minilm_tokenizer, out, WindowSettings(**tiny_settings), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leftovers_are_removed(tiny_settings, tmp_path, minilm_tokenizer, tiny_squad_file):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname().replace("-", "_")
    leftover = tmp_path / f".store.tmp-{host}-{int(dead.stdout)}-deadbeef"  # what a SIGKILLed prepare leaves
    leftover.mkdir()
    (leftover / "input_ids.npy").write_bytes(b"half")
    # on a shared file system another node's writer may be alive: its temporaries are not ours to judge
    elsewhere = tmp_path / f".store.tmp-otherhost-{int(dead.stdout)}-deadbeef"
    elsewhere.mkdir()
    with pytest.raises(SpanqaError, match="meta.json: missing"):
        WindowStore.open(leftover)
    settings = WindowSettings(**tiny_settings)
    prepare(tiny_squad_file, minilm_tokenizer, tmp_path / "store", settings, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name, "store"]


def test_interrupted_rebuild_keeps_the_old_store(
    tiny_settings, tmp_path, minilm_tokenizer, tiny_squad_file, monkeypatch
):
    out = tmp_path / "store"
    old = prepare(tiny_squad_file, minilm_tokenizer, out, WindowSettings(**tiny_settings), progress=False)

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.np, "save", die)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            tiny_squad_file,
            minilm_tokenizer,
            out,
            WindowSettings(max_seq_length=96, doc_overlap=16, max_query_length=32),
            progress=False,
        )
    assert WindowStore.open(out).meta == old.meta
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_check_compatible_names_what_is_stale(tiny_store, minilm_tokenizer, tiny_settings, tiny_squad_file):
    from spanqa.data.prepare import file_sha256

    tiny_store.check_compatible(
        minilm_tokenizer, WindowSettings(**tiny_settings), file_sha256(tiny_squad_file)
    )
    with pytest.raises(
        SpanqaError, match=r"meta.json: built with window settings .*, not .*'doc_overlap': 16"
    ):
        tiny_store.check_compatible(settings=WindowSettings(**{**tiny_settings, "doc_overlap": 16}))
    with pytest.raises(SpanqaError, match=r"meta.json: built from another version of .*squad_v2_tiny.json"):
        tiny_store.check_compatible(source_sha256="0" * 64)
    extended = AutoTokenizer.from_pretrained(minilm_dir())
    extended.add_tokens(["spanqa-new-token"])  # a changed vocabulary changes the fingerprint
    with pytest.raises(SpanqaError, match=r"meta.json: built with another tokenizer \(fingerprint"):
        tiny_store.check_compatible(tokenizer=extended)
    used = AutoTokenizer.from_pretrained(minilm_dir())
    used("question", "context " * 50, truncation="only_second", max_length=32, stride=8, padding="max_length")
    tiny_store.check_compatible(tokenizer=used)  # per-call truncation/padding state is not the tokenizer


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def _labels_outside_context(store_dir):
    """end_positions with one labelled window's end moved past its context (the last token, [SEP])."""
    end = np.load(store_dir / "end_positions.npy")
    labelled = int(np.flatnonzero(np.load(store_dir / "start_positions.npy"))[0])
    end[labelled] = np.load(store_dir / "window_lengths.npy")[labelled] - 1
    return end


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: (p / "meta.json").unlink(),
            r"meta.json: missing \(not a window store, or a partial one\)",
        ),
        (lambda p: (p / "meta.json").write_text("{"), r"meta.json: corrupt"),
        (
            lambda p: (p / "end_positions.npy").unlink(),
            r"end_positions.npy: missing \(partial window store\)",
        ),
        (lambda p: (p / "examples.jsonl").unlink(), r"examples.jsonl: missing \(partial window store\)"),
        (
            lambda p: (p / "input_ids.npy").write_bytes((p / "input_ids.npy").read_bytes()[:200]),
            r"input_ids.npy: corrupt",
        ),
        (
            lambda p: np.save(p / "window_lengths.npy", np.zeros(3, np.int16)),
            r"window_lengths.npy: shape \(3,\), expected",
        ),
        (
            lambda p: np.save(p / "start_positions.npy", np.zeros(3, np.int64)),
            r"start_positions.npy: dtype int64, meta.json says int16",
        ),
        (
            lambda p: (p / "meta.json").write_text(
                json.dumps({**json.loads((p / "meta.json").read_text()), "format_version": 99})
            ),
            r"meta.json: store format version 99, this spanqa reads version 3",
        ),
        (
            lambda p: np.save(p / "end_positions.npy", _labels_outside_context(p)),
            r"start_positions.npy: window \d+: answer \d+\.\.\d+ is not a span inside its context",
        ),
    ],
    ids=[
        "no-meta",
        "bad-meta",
        "no-array",
        "no-examples",
        "truncated",
        "bad-shape",
        "bad-dtype",
        "version",
        "labels",
    ],  # fmt: skip
)
def test_damaged_store_fails_to_open_naming_the_file(tiny_store, tmp_path, damage, message):
    """Each check on its own: the damaged files' checksums are brought up to date first (a store written
    wrong, not one changed since), so that the check after the checksums is the one that speaks."""
    path = copy_store(tiny_store.path, tmp_path / "copy")
    damage(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None  # the damage is to meta.json itself
    if isinstance(meta, dict) and "checksums" in meta:
        present = {name: crc32(path / name) for name in meta["checksums"] if (path / name).is_file()}
        (path / "meta.json").write_text(json.dumps({**meta, "checksums": {**meta["checksums"], **present}}))
    with pytest.raises(SpanqaError, match=message) as err:
        WindowStore.open(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["input_ids.npy", "start_positions.npy", "examples.jsonl"])
def test_a_store_changed_after_it_was_written_fails_its_checksum(tiny_store, tmp_path, name):
    """Same size, other bytes: what a flipped disk block or a clobbering copy leaves."""
    path = copy_store(tiny_store.path, tmp_path / "copy")
    data = bytearray((path / name).read_bytes())
    data[-3] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(SpanqaError, match=rf"{name}: corrupt: its CRC-32 differs from meta.json"):
        WindowStore.open(path)


def test_token_ids_past_the_vocabulary_are_refused(tiny_store, tmp_path):
    path = copy_store(tiny_store.path, tmp_path / "copy")
    ids = np.load(path / "input_ids.npy")
    ids[5] = np.iinfo(ids.dtype).max  # 65535 > MiniLM's 30,522
    np.save(path / "input_ids.npy", ids)
    meta = json.loads((path / "meta.json").read_text())
    meta["checksums"]["input_ids.npy"] = crc32(path / "input_ids.npy")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        SpanqaError, match=r"input_ids.npy: token ids past the tokenizer's vocabulary \(30522\)"
    ):
        WindowStore.open(path)


def test_a_truncated_dev_examples_file_is_found_when_the_store_opens(tiny_store, tmp_path):
    path = copy_store(tiny_store.path, tmp_path / "copy")
    lines = (path / "examples.jsonl").read_text().splitlines(keepends=True)
    (path / "examples.jsonl").write_text("".join(lines[:-3]))
    meta = json.loads((path / "meta.json").read_text())
    meta["checksums"]["examples.jsonl"] = crc32(path / "examples.jsonl")
    (path / "meta.json").write_text(json.dumps(meta))
    WindowStore.open(path)  # a training store: examples are read when needed
    with pytest.raises(SpanqaError, match=r"examples.jsonl: \d+ examples, meta.json says"):
        WindowStore.open(path, read_examples=True)


# ---- the command line: every bad input gives one line on stderr, exit 2, and writes nothing ----


def run_prepare(capsys, data_file, out, *extra, tokenizer=None):
    args = ["prepare", "--data_file", str(data_file), "--tokenizer", str(tokenizer or minilm_dir())]
    code = cli_main([*args, "--out", str(out), "--no_progress", *extra])
    return code, capsys.readouterr()


def test_cli_prepare_prints_counts(tiny_settings, tmp_path, capsys, tiny_squad_file):
    flags = sum(([f"--{k}", str(v)] for k, v in tiny_settings.items()), [])
    code, output = run_prepare(capsys, tiny_squad_file, tmp_path / "out", *flags)
    assert code == 0
    assert "0 repaired, 0 dropped" in output.out and "windows" in output.out
    assert WindowStore.open(tmp_path / "out").meta["settings"] == WindowSettings(**tiny_settings).as_dict()
    assert "reused" not in output.out
    code, output = run_prepare(capsys, tiny_squad_file, tmp_path / "out", *flags)
    assert code == 0 and "(reused: same source, tokenizer, settings and format)" in output.out


def write(path, text):
    path.write_text(text)
    return path


BASE_DOC = {
    "version": "v2.0",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France.",
                    "qas": [
                        {
                            "id": "a",
                            "question": "Capital?",
                            "answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {"id": "b", "question": "Q?", "answers": []},
                    ],
                }
            ],
        }
    ],
}


def doc_with(edit):
    doc = json.loads(json.dumps(BASE_DOC))
    edit(doc)
    return json.dumps(doc)


BAD_FILES = {
    "not-json": ("hello", "not valid JSON: Expecting value (line 1, column 1)"),
    "truncated": (json.dumps(BASE_DOC)[:-30], "truncated JSON"),
    "top-level": ("[]", "top level must be an object with a 'data' list"),
    "missing-field": (
        doc_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("id")),
        "data[0].paragraphs[0].qas[1].id: missing field",
    ),
    "mistyped-field": (
        doc_with(lambda d: d["data"][0]["paragraphs"][0].update(qas={})),
        "data[0].paragraphs[0].qas: must be a list, got an object",
    ),
    "only-blank-contexts": (
        doc_with(lambda d: [p.update(context="\u200b") for a in d["data"] for p in a["paragraphs"]]),
        "data: no questions with a usable answer or is_impossible",
    ),
    "no-questions": ('{"version": "v2.0", "data": []}', "data: no questions"),
    "duplicate-id": (
        doc_with(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="a")),
        "data[0].paragraphs[0].qas[1].id: duplicate question id 'a'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_cli_bad_data_file(case, tmp_path, capsys):
    text, message = BAD_FILES[case]
    data = write(tmp_path / "bad.json", text)
    code, output = run_prepare(capsys, data, tmp_path / "out")
    assert code == 2
    assert output.err.startswith(f"spanqa prepare: error: {data}: ")
    assert message in output.err and output.err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_cli_missing_data_file(tmp_path, capsys):
    code, output = run_prepare(capsys, tmp_path / "nope.json", tmp_path / "out")
    assert code == 2 and "nope.json: no such file" in output.err
    assert list(tmp_path.iterdir()) == []


def test_cli_tokenizer_that_cannot_be_loaded(tmp_path, capsys, tiny_squad_file):
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    code, output = run_prepare(capsys, tiny_squad_file, tmp_path / "out", tokenizer=empty)
    assert code == 2 and output.err.count("\n") == 1
    assert f"--tokenizer: cannot load a tokenizer from '{empty}'" in output.err
    assert not (tmp_path / "out").exists()


def test_cli_slow_tokenizer_is_refused(tmp_path, capsys, tiny_squad_file):
    # transformers 5 keeps the pure-Python BERT tokenizer as BertTokenizerLegacy: no character offsets
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "BertTokenizerLegacy"):
        pytest.skip("this transformers has no BertTokenizerLegacy")
    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(minilm_dir() / "vocab.txt", slow / "vocab.txt")
    (slow / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerLegacy"}))
    code, output = run_prepare(capsys, tiny_squad_file, tmp_path / "out", tokenizer=slow)
    assert code == 2 and output.err.count("\n") == 1
    assert f"--tokenizer: '{slow}' is not a fast tokenizer" in output.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max_seq_length", "128", "--doc_overlap", "128"],
            "--doc_overlap: 128 must be smaller than the context room",
        ),
        (
            ["--doc_stride", "100", "--doc_overlap", "100"],
            "--doc_overlap, --doc_stride: give one of them, not both",
        ),
        (["--max_query_length", "0"], "--max_query_length: must be a positive integer, got 0"),
    ],
)
def test_cli_bad_window_settings(flags, message, tmp_path, capsys, tiny_squad_file):
    code, output = run_prepare(capsys, tiny_squad_file, tmp_path / "out", *flags)
    assert code == 2 and message in output.err and output.err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_replace_a_foreign_directory(tmp_path, capsys, tiny_squad_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, output = run_prepare(capsys, tiny_squad_file, out)
    assert code == 2 and "is not empty and is not a window store" in output.err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
