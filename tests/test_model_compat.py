"""What differs between transformers 4 and 5 is handled in spanqa.model.compat (these run on both majors:
CI runs the suite on each)."""

from __future__ import annotations

import pytest
import torch

from spanqa.model import compat
from spanqa.model.build import build_model, from_pretrained, save_pretrained
from spanqa.testing import tiny_bert_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir, tmp_path_factory):
    """The tiny BERT saved in bfloat16: transformers 5 would load it as bf16 by default ("auto")."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("model") / "tiny-bert-bf16"
    AutoModel.from_pretrained(str(tiny_dir)).to(torch.bfloat16).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("head", ["span", "crf"])
def test_a_half_precision_checkpoint_builds_and_exports_in_fp32(bf16_dir, tmp_path, head):
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(bf16_dir / "model.safetensors")).values()} == {torch.bfloat16}
    model = build_model(str(bf16_dir), head)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    save_pretrained(model, tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export", head)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_no_progress_bars_from_spanqas_own_loads_and_saves(tiny_dir, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    save_pretrained(build_model(str(tiny_dir), "span"), tmp_path / "export")
    from_pretrained(tmp_path / "export", "span")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s]" not in err
    assert hf_logging.is_progress_bar_enabled() == before  # put back as it was


def test_the_qa_pipeline_is_there_exactly_before_5_3():
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert compat.has_qa_pipeline() == ((major, minor) < (5, 3))
    assert compat.major_version() == major
