"""spanqa.io: atomic writes with the umask's modes, temporaries of killed writers, one-line read errors."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from spanqa import io
from spanqa.errors import SpanqaError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test, restore it after."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_and_directories_get_the_umasks_modes(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    io.write_json(tmp_path / "a.json", {"x": 1})
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner.txt").write_text("made inside the atomic directory")
        io.write_text(tmp / "w.txt", "written by io")
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(tmp_path / "d") == dir_mode and mode(tmp_path / "d" / "w.txt") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]  # no temporaries left


def test_export_and_eval_files_are_readable_by_the_group_under_umask_022(tmp_path, umask):
    """best_model/ and eval/ as training writes them (mkdtemp/mkstemp would give 0700/0600)."""
    import torch
    from transformers import AutoTokenizer

    from spanqa.eval.evaluate import write_prediction_files
    from spanqa.export import ExportInfo, export_model
    from spanqa.model.build import build_model
    from spanqa.testing import tiny_bert_dir

    umask(0o022)
    tiny = tiny_bert_dir(tmp_path / "tiny")
    torch.manual_seed(0)
    export_model(
        build_model(str(tiny), "crf"),
        AutoTokenizer.from_pretrained(str(tiny)),
        tmp_path / "best_model",
        ExportInfo("crf"),
    )
    write_prediction_files(tmp_path / "eval", {"q": "a"}, {"q": 1.0}, {"exact": 100.0})
    for folder in ("best_model", "eval"):
        assert mode(tmp_path / folder) == 0o755, folder
        files = list((tmp_path / folder).iterdir())
        assert files and all(mode(f) == 0o644 for f in files), {f.name: oct(mode(f)) for f in files}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = io.write_text(tmp_path / "t.txt", "old")
    with pytest.raises(RuntimeError), io.atomic_file(target) as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is replaced
        io.write_json(target, {"x": float("nan")})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_a_failed_directory_keeps_the_old_one(tmp_path):
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_only_this_hosts_dead_writers_temporaries_are_removed(tmp_path):
    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout
    )
    host = socket.gethostname().replace("-", "_")
    ours_dead = tmp_path / f".store.tmp-{host}-{dead}-00000000"
    ours_alive = tmp_path / f".store.tmp-{host}-{os.getpid()}-00000000"
    theirs = tmp_path / f".store.tmp-otherhost-{dead}-00000000"
    unrelated = tmp_path / ".store.notes"
    for path in (ours_dead, ours_alive, theirs):
        path.mkdir()
    unrelated.write_text("the user's")
    assert io.remove_abandoned(tmp_path / "store") == [ours_dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (ours_alive, theirs, unrelated)
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2", "truncated JSON"),
        ("{1: 2}", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
    ids=["truncated", "invalid", "deep", "binary"],
)
def test_read_json_errors_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpanqaError) as err:
        io.read_json(path, "data file")
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_read_text_of_a_missing_file_or_a_directory(tmp_path):
    with pytest.raises(SpanqaError, match="no such data file"):
        io.read_text(tmp_path / "missing.json", "data file")
    with pytest.raises(SpanqaError, match="is a directory"):
        io.read_text(tmp_path, "data file")
    assert json.loads(io.write_json(tmp_path / "ok.json", {"é": 1}).read_text()) == {"é": 1}


@pytest.mark.parametrize("keep", [True, False])
def test_two_writers_finishing_one_directory_at_once(tmp_path, monkeypatch, keep):
    """The other writer's directory appears between this writer's look and its rename (Errno 39 on
    Linux): a writer that accepts theirs keeps it; anything else fails loudly."""
    out = tmp_path / "store"
    real_is_dir = Path.is_dir
    looks = []

    def not_there_at_the_first_look(path):
        if path == out and not looks:  # looked before the other writer's rename landed
            looks.append(path)
            return False
        return real_is_dir(path)

    with io.atomic_dir(out) as theirs:
        (theirs / "who").write_text("theirs")
    monkeypatch.setattr(Path, "is_dir", not_there_at_the_first_look)
    monkeypatch.setattr(Path, "exists", lambda path: path != out and os.path.exists(path))
    if keep:
        with io.atomic_dir(out, keep_theirs=lambda d: True) as mine:
            (mine / "who").write_text("mine")
        assert (out / "who").read_text() == "theirs"
    else:
        with pytest.raises(OSError), io.atomic_dir(out) as mine:
            (mine / "who").write_text("mine")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary left either way


@pytest.mark.parametrize("theirs_pass", [True, False])
def test_a_finished_copy_is_kept_only_when_the_writer_accepts_it(tmp_path, theirs_pass):
    """Another writer's complete copy, already in place, is not swapped away (readers may have it
    open); one the writer rejects (stale inputs) is replaced."""
    out = tmp_path / "store"
    with io.atomic_dir(out) as theirs:
        (theirs / "who").write_text("theirs")
    inode = out.stat().st_ino

    def accept(path):
        return (path / "who").read_text() == "theirs" and theirs_pass

    with io.atomic_dir(out, keep_theirs=accept) as mine:
        (mine / "who").write_text("mine")
    assert (out / "who").read_text() == ("theirs" if theirs_pass else "mine")
    assert (out.stat().st_ino == inode) == theirs_pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_an_uncached_hub_name_offline_fails_at_once_naming_the_flag(tmp_path, monkeypatch):
    # transformers alone would retry the hub for about a minute before failing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SpanqaError, match=r"^--model: 'SpanBERT/spanbert-base-cased' is not in the local"):
        io.check_hub_name("SpanBERT/spanbert-base-cased", "--model")
    assert not io.hub_reachable()
