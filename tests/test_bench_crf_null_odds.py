"""bench/crf_null_odds.py on a tiny CRF export: it scores the answers and null odds `spanqa predict`
gives, beside its alternatives (which variant ranks "no answer" best is the benchmark's to measure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from spanqa.data.windows import WindowSettings
from spanqa.eval.postprocess import AnswerSettings
from spanqa.export import ExportInfo

BENCH = Path(__file__).resolve().parent.parent / "bench" / "crf_null_odds.py"
FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_crf_null_odds", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported(head: str, root: Path) -> Path:
    """A tiny random BERT with `head`, exported as training exports it."""
    import torch
    from transformers import AutoTokenizer

    from spanqa.export import export_model
    from spanqa.model.build import build_model
    from spanqa.testing import tiny_bert_dir

    tiny = tiny_bert_dir(root / "tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(str(tiny), head)
    windows = WindowSettings(max_seq_length=64, doc_overlap=16, max_query_length=16)
    info = ExportInfo(head, windows, AnswerSettings(max_answer_length=8, n_best_size=10))
    export_model(model, AutoTokenizer.from_pretrained(str(tiny)), root / head, info)
    return root / head


@pytest.fixture(scope="module")
def crf_export(tmp_path_factory) -> Path:
    return exported("crf", tmp_path_factory.mktemp("models"))


def test_its_first_variant_is_what_spanqa_predict_answers_with(bench, crf_export, tmp_path):
    from spanqa.export import load_export
    from spanqa.predict import predict, read_questions

    store, cands, window_indices = bench.candidates(str(crf_export), str(FIXTURE), tmp_path)
    predictions, odds = bench.variants(store, cands, window_indices)
    assert len(odds) == 6 and all(set(v) == set(predictions) for v in odds.values())
    model, tokenizer, info = load_export(crf_export)
    predicted = predict(model, tokenizer, read_questions(FIXTURE), info)
    spanqas = odds["min null - best span (spanqa's)"]
    assert {q: p.null_odds for q, p in predicted.items()} == pytest.approx(spanqas, abs=1e-5)
    assert {q: p.answer for q, p in predicted.items()} == {
        q: ("" if spanqas[q] > 0 else text) for q, text in predictions.items()
    }


def test_the_command_prints_each_variants_best_f1(bench, crf_export, capsys):
    assert bench.main([str(crf_export), str(FIXTURE)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split()[:2] == ["null", "odds"] and rows[0].split()[-1] == "AUC" and len(rows) == 7
    assert all(0 <= float(row.split()[-4]) <= 100 and 0 <= float(row.split()[-1]) <= 1 for row in rows[1:])


def test_a_span_head_export_is_refused_in_one_line(bench, tmp_path):
    with pytest.raises(SystemExit, match="has the span head, not crf"):
        bench.main([str(exported("span", tmp_path)), str(FIXTURE)])
