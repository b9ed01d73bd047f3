"""Shared fixtures.

- `minilm_tokenizer` (session): the fast uncased BERT WordPiece tokenizer of all-MiniLM-L6-v2
  (`spanqa.testing.minilm_dir()`), loaded once (~2 s).
- `tiny_squad_file` / `tiny_squad_v1_file`: small SQuAD v2.0 / v1.1 files in tests/fixtures
  (51 and 27 questions; see tests/fixtures/README.md).
- `tiny_settings`: TINY_SETTINGS as a dict, for tests that prepare their own store alike.
- `tiny_store` (session): the window store of `tiny_squad_file` prepared with the MiniLM tokenizer at
  TINY_SETTINGS (max_seq_length 128, doc_overlap 32, max_query_length 32, so that long contexts
  really split into several windows: 51 examples -> ~90 windows). Read-only: do not write into it;
  tests that need to modify a store prepare their own.
- `tiny_model` (session): spanqa.testing's tiny random BERT; `tiny_model_no_dropout` the same without
  dropout (runs split differently agree only then); `cache_dir` (session): a --cache_dir for training
  runs (stores are keyed by their inputs, so tests share them).
- `mrqa_sample` (session): the bundled SQuAD v2 sample converted to MRQA with `spanqa convert --to
  mrqa`: {"train": path, "dev": path}.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_SETTINGS = {"max_seq_length": 128, "doc_overlap": 32, "max_query_length": 32}


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from spanqa.io import load_tokenizer
    from spanqa.testing import minilm_dir

    return load_tokenizer(minilm_dir())


@pytest.fixture(scope="session")
def tiny_settings() -> dict[str, int]:
    """The window settings of `tiny_store` (a fresh copy: safe to modify)."""
    return dict(TINY_SETTINGS)


@pytest.fixture(scope="session")
def tiny_squad_file() -> Path:
    return FIXTURES / "squad_v2_tiny.json"


@pytest.fixture(scope="session")
def tiny_squad_v1_file() -> Path:
    return FIXTURES / "squad_v1_tiny.json"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, minilm_tokenizer, tiny_squad_file):
    from spanqa.data.prepare import prepare
    from spanqa.data.windows import WindowSettings

    out = tmp_path_factory.mktemp("tiny_store") / "store"
    return prepare(tiny_squad_file, minilm_tokenizer, out, WindowSettings(**TINY_SETTINGS), progress=False)


@pytest.fixture(scope="session")
def mrqa_sample(tmp_path_factory) -> dict[str, Path]:
    from spanqa.cli import main as cli

    sample = Path(__file__).resolve().parent.parent / "spanqa" / "sample"
    out = tmp_path_factory.mktemp("mrqa-sample")
    files = {name: out / f"{name}.jsonl.gz" for name in ("train", "dev")}
    for name, path in files.items():
        argv = ["convert", "--to", "mrqa", "--data_file", str(sample / f"{name}.json"), "--out", str(path)]
        assert cli(argv) == 0
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from spanqa.testing import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tiny_model, tmp_path_factory) -> Path:
    from runs import no_dropout_copy

    return no_dropout_copy(tiny_model, tmp_path_factory.mktemp("model") / "tiny-bert-no-dropout")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
