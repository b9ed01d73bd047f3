"""The trainer's data side without a training run: --prepared stores checked against the run's
tokenizer and window flags, and evaluation scored against the dev file's untouched golds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spanqa.config import parse_train_args
from spanqa.data.prepare import prepare
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.testing import minilm_dir
from spanqa.train.data import gold_questions, prepare_stores
from spanqa.train.distributed import DistEnv

ONE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, minilm_tokenizer, tiny_squad_file):
    """A --prepared DIR: train/ and dev/ stores of the tiny fixture, window settings 128/32/32."""
    root = tmp_path_factory.mktemp("prepared")
    for role in ("train", "dev"):
        prepare(
            tiny_squad_file,
            minilm_tokenizer,
            root / role,
            WindowSettings(max_seq_length=128, doc_overlap=32, max_query_length=32),
            progress=False,
        )
    return root


def config_for(prepared: Path, tmp_path: Path, *extra: str):
    flags = ["--model", str(minilm_dir()), "--prepared", str(prepared), "--output_dir", str(tmp_path / "out")]
    return parse_train_args([*flags, "--max_seq_length", "128", "--doc_overlap", "32", *extra])


def test_prepared_stores_open_when_they_match_the_run(prepared_dir, minilm_tokenizer, tmp_path):
    config = config_for(prepared_dir, tmp_path, "--max_query_length", "32")
    train, dev = prepare_stores(config, minilm_tokenizer, ONE_PROCESS)
    assert len(train) == len(dev) > 0


def test_prepared_stores_with_other_window_settings_are_refused(prepared_dir, minilm_tokenizer, tmp_path):
    config = config_for(prepared_dir, tmp_path, "--max_query_length", "64")
    with pytest.raises(SpanqaError, match=r"train/meta.json: built with window settings .*max_query_length"):
        prepare_stores(config, minilm_tokenizer, ONE_PROCESS)


@pytest.fixture
def dev_file_with_a_bad_answer(tmp_path, tiny_squad_file) -> Path:
    """The fixture with one extra gold answer that does not occur in its context: the store drops it,
    the official scorer still counts it."""
    data = json.loads(tiny_squad_file.read_text())
    qa = next(q for a in data["data"] for p in a["paragraphs"] for q in p["qas"] if q["answers"])
    qa["answers"].append({"text": "a phrase found nowhere", "answer_start": 0})
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    return path


def test_evaluation_scores_the_dev_files_golds_untouched(
    dev_file_with_a_bad_answer, minilm_tokenizer, tmp_path
):
    store = prepare(
        dev_file_with_a_bad_answer,
        minilm_tokenizer,
        tmp_path / "dev",
        WindowSettings(max_seq_length=128, doc_overlap=32, max_query_length=32),
        progress=False,
    )
    assert store.meta["validation"]["answers_dropped"] == 1
    golds = {g.id: g.answers for g in gold_questions(store, None)}  # the file the store names
    texts = {ex.id: tuple(a.text for a in ex.answers) for ex in store.examples()}
    differing = [qid for qid in golds if golds[qid] != texts[qid]]
    assert len(differing) == 1 and "a phrase found nowhere" in golds[differing[0]]


def test_a_store_whose_source_is_gone_scores_its_own_examples(
    dev_file_with_a_bad_answer, minilm_tokenizer, tmp_path, caplog
):
    store = prepare(
        dev_file_with_a_bad_answer,
        minilm_tokenizer,
        tmp_path / "dev",
        WindowSettings(max_seq_length=128, doc_overlap=32, max_query_length=32),
        progress=False,
    )
    shutil.move(dev_file_with_a_bad_answer, tmp_path / "moved.json")
    golds = gold_questions(store, None)
    assert [g.id for g in golds] == [ex.id for ex in store.examples()]
    assert "is not here (or changed)" in caplog.text
