"""The bundled sample is what spanqa/sample/make_sample.py cuts from the official SQuAD v2.0 files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spanqa.testing import shared_squad2

SAMPLE = Path(__file__).resolve().parent.parent / "spanqa" / "sample"
COMMAND = [
    "--train_questions",
    "2400",
    "--unanswerable_share",
    "0.334",
    "--dev_questions",
    "500",
    "--dev_articles",
    "18",
]  # fmt: skip  (as spanqa/sample/README.md gives it)


def test_make_sample_makes_the_bundled_files(tmp_path):
    source = shared_squad2("dev-v2.0.json").parent
    if not (source / "train-v2.0.first10articles.json").is_file() or not (source / "dev-v2.0.json").is_file():
        pytest.skip(f"the official SQuAD v2.0 files are not in {source}")
    done = subprocess.run(
        [sys.executable, str(SAMPLE / "make_sample.py"), str(source), str(tmp_path), *COMMAND],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("train.json", "dev.json"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_the_sample_has_the_real_sets_share_of_unanswerable_questions():
    def shares(name):
        qas = [
            qa
            for a in json.loads((SAMPLE / name).read_text())["data"]
            for p in a["paragraphs"]
            for qa in p["qas"]
        ]
        return len(qas), sum(bool(qa.get("is_impossible")) for qa in qas) / len(qas)

    train, dev = shares("train.json"), shares("dev.json")
    assert train[0] >= 2400 and 0.32 <= train[1] <= 0.35  # the real train set: 33.4%
    assert dev[0] >= 500 and 0.4 <= dev[1] <= 0.55  # the real dev set: 50.0%

    def titles(name):
        return {a["title"] for a in json.loads((SAMPLE / name).read_text())["data"]}

    assert not titles("train.json") & titles("dev.json")
