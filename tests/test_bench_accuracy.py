"""bench/accuracy.py end to end at a tiny scale: both heads trained through the deepspeed launcher on
two CPU ranks, the table and the JSON line it promises (what the heads reach is the benchmark's to
measure, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spanqa.testing import tiny_bert_dir

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "accuracy.py"
FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
METRIC_KEYS = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "total")

pytestmark = pytest.mark.slow


def test_both_heads_train_and_the_table_and_json_line_come_out(tmp_path):
    from spanqa.eval.squad_metric import read_gold_questions

    model = tiny_bert_dir(tmp_path / "tiny-bert")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--model", str(model), "--train_file", str(FIXTURE),
            "--dev_file", str(FIXTURE), "--questions", "24", "--dev_questions", "12", "--epochs", "1",
            "--out", str(tmp_path / "out"), "--json", "--", "--max_seq_length", "128",
            "--doc_overlap", "32", "--max_query_length", "32",
        ],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"span", "crf", "no_answer"}
    for head in ("span", "crf"):
        assert result[head]["head"] == head and result[head]["total"] == 12
        assert all(isinstance(result[head][key], float | int) for key in METRIC_KEYS)
        assert (
            result[head]["train_seconds"] > 0
            and result[head]["wall_seconds"] >= result[head]["train_seconds"]
        )
        assert "--max_seq_length 128" in result[head]["command"]  # flags after -- reach every run
        assert any(line.startswith(head) for line in lines)
    # the baseline is scored by the same metric on the same 12 questions
    dev = read_gold_questions(tmp_path / "out" / "data" / "dev.json")
    unanswerable = 100.0 * sum(not q.has_answer for q in dev) / len(dev)
    assert len(dev) == 12 and result["no_answer"]["exact"] == pytest.approx(unanswerable)
    assert any(line.startswith("always no answer") for line in lines)
    # each head's best_f1 set against answering nothing, question by question: the per-question F1s at the
    # run's best threshold average to its best_f1, so their difference from the baseline is best_f1's margin
    for head in ("span", "crf"):
        margin = result[head]["over_no_answer"]
        assert margin["difference"] == pytest.approx(result[head]["best_f1"] - unanswerable, abs=1e-9)
        assert margin["low"] <= margin["difference"] <= margin["high"] and 0 < margin["p_value"] <= 1
        assert 0 <= result[head]["null_auc"] <= 1 and 0 <= result[head]["best_model"]["null_auc"] <= 1
    assert "best_f1 over always no answer" in done.stdout
    # --score_only trains nothing and gives the same figures from what the runs left in --out
    rescored = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--score_only", "--json"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    again = json.loads(rescored.stdout.strip().splitlines()[-1])
    for head in ("span", "crf"):
        keys = (*METRIC_KEYS, "over_no_answer", "null_auc", "train_seconds", "best_model")
        assert {k: again[head][k] for k in keys} == {k: result[head][k] for k in keys}
        assert result[head]["best_model"]["over_no_answer"]["resamples"] == 10_000
