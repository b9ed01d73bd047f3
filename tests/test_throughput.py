"""bench/throughput.py: its synthetic windows, its figures, and a real CPU run through the Trainer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spanqa.data.loader import collate_windows
from spanqa.data.store import WindowStore
from spanqa.errors import SpanqaError
from spanqa.testing import MODEL_SHAPES, placeholder_tokenizer, write_bert_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "throughput.py"


def load_bench():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: bench/ first on the path (its synthetic.py)
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = load_bench()
import synthetic as bench_synthetic  # noqa: E402  (bench/synthetic.py, on the path since load_bench)


def test_fallback_histogram_has_the_measured_dev_distribution():
    shapes = bench_synthetic.shapes_from_histogram(384)
    assert len(shapes.lengths) == 12134  # windows of the measured SQuAD v2 dev store
    assert shapes.lengths.mean() == pytest.approx(180.0, abs=1.0)
    assert shapes.lengths.max() == 384 and (shapes.lengths == 384).sum() >= 264
    assert (shapes.context_start < shapes.context_end).all() and (
        shapes.context_end == shapes.lengths - 2
    ).all()
    assert bench_synthetic.shapes_from_histogram(256).lengths.max() == 256


def test_synthetic_store_copies_the_structure_of_a_real_one(tmp_path, tiny_store, tiny_settings):
    shapes = bench_synthetic.shapes_from_store(tiny_store, "tiny")
    model_dir = write_bert_dir(tmp_path / "model", "tiny", placeholder_tokenizer(30522))
    store = bench_synthetic.write_synthetic_store(
        tmp_path / "store", shapes, 50, model_dir, tiny_settings, seed=1
    )
    assert isinstance(store, WindowStore) and len(store) == 50
    real = set(zip(tiny_store.window_lengths.tolist(), tiny_store.context_start.tolist(), strict=True))
    synthetic = set(zip(store.window_lengths.tolist(), store.context_start.tolist(), strict=True))
    assert synthetic <= real  # every synthetic window has the length and question part of a real one
    window = store.window(3)
    cs, n = window["context_start"], len(window["input_ids"])
    assert (
        window["input_ids"][0] == 101
        and window["input_ids"][cs - 1] == 102
        and window["input_ids"][n - 1] == 102
    )
    assert (window["token_type_ids"][cs:] == 1).all() and (window["token_type_ids"][:cs] == 0).all()
    batch = collate_windows([store.window(i) for i in range(8)])
    assert int(batch["attention_mask"].sum()) == int(store.window_lengths[:8].sum())
    assert int(batch["input_ids"].max()) < 30522


def test_model_dir_has_the_spanbert_base_shape_and_a_tokenizer_of_its_vocabulary(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    # Only the config and tokenizer here: 110M random weights are the slow part and prove nothing more.
    vocab = placeholder_tokenizer(28996).get_vocab()
    assert len(vocab) == 28996 and vocab["[CLS]"] == 101 and sorted(vocab.values()) == list(range(28996))
    config = AutoConfig.for_model("bert", **MODEL_SHAPES["spanbert-base"])
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    model_dir = write_bert_dir(tmp_path / "tiny", "tiny", placeholder_tokenizer(30522))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tokenizer) == 30522 and tokenizer.cls_token_id == 101 and tokenizer.sep_token_id == 102


def test_summary_sums_ranks_and_divides_by_every_device():
    rank = dict(
        wall_seconds=2.0,
        windows=16,
        real_tokens=3000,
        padded_tokens=4000,
        flops=10**12,
        step_seconds=[0.5, 0.5, 0.4, 0.6],
        peak_memory_bytes=100,
        cpu_share=0.9,
    )
    slower = {
        **rank,
        "wall_seconds": 4.0,
        "step_seconds": [0.5, 0.9, 0.4, 0.6],
        "peak_memory_bytes": 300,
        "cpu_share": 0.5,
    }
    summary = bench.summarize([rank, slower], peak_flops=1e12)
    assert summary["samples_per_s"] == 32 / 4.0 and summary["real_tokens_per_s"] == 6000 / 4.0
    assert summary["achieved_tflops"] == pytest.approx(0.5) and summary["mfu"] == pytest.approx(0.25)
    assert summary["step_time_median_s"] == pytest.approx(0.55)  # a step ends when its slowest rank does
    assert summary["peak_memory_bytes"] == 300 and summary["real_tokens_fraction"] == 0.75
    assert summary["cpu_share"] == 0.5  # the rank that got the least CPU explains the slowest steps


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(SpanqaError, match="--steps"):
        bench.parse_args(["--steps", "0"])
    with pytest.raises(SpanqaError, match="--model: .*no config.json"):
        bench.parse_args(["--model", str(tmp_path)])


def test_relaunch_goes_through_the_deepspeed_launcher():
    command = bench.relaunch_command(["--world_size", "2", "--json"], 2)
    assert command[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    assert command[-4:] == [str(SCRIPT), "--world_size", "2", "--json"]
    port = int(command[command.index("--master_port") + 1])
    assert 0 < port < 65536


def run_bench(args: list[str], tmp_path: Path) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_")}
    # One thread: on a CPU shared by parallel test runs, OpenMP threads that wait on each other make
    # steps 10× slower; the figures do not matter here, only that they are measured and sane.
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_model_trains_on_cpu_and_reports_positive_figures(tmp_path, tiny_store):
    head = "crf"  # the head with more moving parts; one run (~30-50 s on a shared CPU) keeps CI short
    result = run_bench(
        ["--model_config", "tiny", "--head", head, "--steps", "3", "--warmup", "1", "--batch_size", "4"]
        + ["--store", str(tiny_store.path), "--max_seq_length", "128", "--doc_overlap", "32"],
        tmp_path,
    )
    for key in ("samples_per_s", "real_tokens_per_s", "step_time_median_s", "peak_memory_bytes", "mfu"):
        assert result[key] > 0, key
    assert result["step_time_p10_s"] <= result["step_time_median_s"] <= result["step_time_p90_s"]
    assert result["device"].startswith("cpu") and result["dtype"] == "fp32" and result["measured_steps"] == 3
    assert result["head"] == head and 0 < result["mfu"] < 1
    assert result["achieved_tflops"] == pytest.approx(result["mfu"] * result["peak_tflops_per_device"])
    assert torch.cuda.is_available() or result["peak_memory_kind"] == "cpu max RSS"
    assert torch.cuda.is_available() or 0 < result["cpu_share"] <= 1.05  # process time over threads × wall
    assert np.isfinite(result["samples_per_s"])
