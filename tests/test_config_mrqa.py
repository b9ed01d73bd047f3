"""--version_2_with_negative from the data: off for MRQA files (and stores made from them), an error
when asked for with one; SQuAD keeps it on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spanqa.config import parse_train_args
from spanqa.data.convert import squad_to_mrqa_lines, write_lines
from spanqa.errors import SpanqaError

SQUAD = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"


@pytest.fixture(scope="module")
def mrqa_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mrqa") / "tiny.jsonl.gz"
    return write_lines(out, squad_to_mrqa_lines(SQUAD, "SQuAD")[0])


def config(tmp_path, train: Path, *extra: str):
    return parse_train_args(
        ["--model", "m", "--output_dir", str(tmp_path / "out"), "--train_file", str(train), *extra]
    )


def test_off_for_mrqa_on_for_squad(tmp_path, mrqa_file):
    mrqa = config(tmp_path, mrqa_file, "--dev_file", str(mrqa_file))
    assert mrqa.answers.version_2_with_negative is False and mrqa.answers.null_threshold == math.inf
    squad = config(tmp_path, SQUAD)
    assert squad.answers.version_2_with_negative is True and squad.answers.null_threshold == 0.0
    assert config(tmp_path, SQUAD, "--dev_file", str(mrqa_file)).answers.version_2_with_negative is False
    # SpanBERT's SQuAD 2.0 recipe leaves it to the data, so it trains on MRQA too
    assert config(tmp_path, mrqa_file, "--preset", "spanbert").answers.version_2_with_negative is False
    assert config(tmp_path, SQUAD, "--preset", "spanbert").answers.version_2_with_negative is True
    assert (
        config(tmp_path, mrqa_file, "--no-version_2_with_negative").answers.version_2_with_negative is False
    )


def test_asking_for_it_with_mrqa_data_names_the_file(tmp_path, mrqa_file):
    with pytest.raises(SpanqaError) as err:
        config(tmp_path, SQUAD, "--dev_file", str(mrqa_file), "--version_2_with_negative")
    assert str(err.value).startswith(f"--version_2_with_negative: {mrqa_file} is MRQA data")
    assert not (tmp_path / "out").exists()


def test_prepared_stores_say_their_format(tmp_path, mrqa_file, minilm_tokenizer, tiny_settings):
    from spanqa.data.prepare import prepare
    from spanqa.data.windows import WindowSettings

    prepare(
        mrqa_file,
        minilm_tokenizer,
        tmp_path / "prepared" / "train",
        WindowSettings(**tiny_settings),
        progress=False,
    )
    flags = ["--model", "m", "--output_dir", str(tmp_path / "out"), "--prepared", str(tmp_path / "prepared")]
    assert parse_train_args(flags).answers.version_2_with_negative is False
    with pytest.raises(SpanqaError, match="--version_2_with_negative: .*tiny.jsonl.gz is MRQA data"):
        parse_train_args([*flags, "--version_2_with_negative"])
