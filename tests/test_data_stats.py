"""`spanqa stats` on a SQuAD file and on a window store."""

from __future__ import annotations

import json

import numpy as np

from spanqa.cli import main as cli_main
from spanqa.testing import minilm_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_stats_of_a_store_and_of_its_source_agree(
    tiny_store, tiny_squad_file, tiny_settings, tmp_path, capsys
):
    flags = sum(([f"--{k}", str(v)] for k, v in tiny_settings.items()), [])
    assert cli_main(["stats", str(tiny_store.path), "--out", str(tmp_path / "store")]) == 0
    args = ["stats", str(tiny_squad_file), "--tokenizer", str(minilm_dir()), "--out", str(tmp_path / "file")]
    assert cli_main([*args, *flags]) == 0
    from_store = json.loads((tmp_path / "store" / "stats.json").read_text())
    from_file = json.loads((tmp_path / "file" / "stats.json").read_text())
    assert from_store["distributions"] == from_file["distributions"]
    assert from_store["windows"] == len(tiny_store) and from_store["examples"] == len(tiny_store.examples())
    windows = from_store["distributions"]["windows_per_example"]
    assert windows["max"] == int(np.bincount(tiny_store.example_index).max()) > 1
    contexts = {ex.context for ex in tiny_store.examples()}
    assert from_store["contexts"] == from_store["distributions"]["context_tokens"]["count"] == len(contexts)
    hist = from_store["distributions"]["question_tokens"]["histogram"]
    assert sum(hist["counts"]) == from_store["examples"] and len(hist["edges"]) == len(hist["counts"]) + 1
    for png in ("question_length.png", "context_length.png", "windows_per_example.png"):
        assert (tmp_path / "store" / png).read_bytes()[:8] == PNG_MAGIC
    assert "question_tokens" in capsys.readouterr().out


def test_stats_of_a_squad_file_needs_a_tokenizer(tiny_squad_file, tmp_path, capsys):
    assert cli_main(["stats", str(tiny_squad_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "spanqa stats: error: --tokenizer: needed to count the tokens of a SQuAD file\n"
    assert not (tmp_path / "out").exists()
