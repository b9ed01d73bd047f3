"""The GPU check kept working on CPU: its dry run end to end (slow), and the parts that decide things —
the step clock, the goals, the projections, the wheel set, the cut MiniLM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def load(name: str):
    sys.path.insert(0, str(BENCH))  # as when run: bench/ first on the path
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check, summary, wheels = load("gpu_check"), load("gpu_summary"), load("gpu_wheels")


# ------------------------------------------------------------------------------------- the dry run


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu_and_reports_the_cuda_ones_skipped(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPANQA_"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    report = json.loads((out / "summary.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] is True and report["seconds"] < report["deadline_seconds"]
    assert steps["install"]["status"] == "skipped" and "dry run" in steps["install"]["reason"]
    for name in ("environment", "pytest", "crf", "throughput", "demo"):  # the summary reports these
        assert steps[name]["status"] == "passed", (name, steps[name])
    tests = report["pytest"]["tests"]
    assert tests and all(t["outcome"] == "skipped" and "needs a CUDA device" in t["message"] for t in tests)
    assert {r["device"] for r in report["crf"]} == {"cpu"} and len(report["crf"]) == 4  # bench/crf.py's cases
    assert sorted(report["throughput"]) == ["bf16 crf", "bf16 span"]
    assert {(s["dtype"], s["reason"]) for s in report["throughput_skipped"]} == {
        ("fp16", "fp16 needs CUDA (DeepSpeed has none on CPU)")
    }
    assert report["projections"]["windows_per_question_384"] > 1
    assert report["demo"]["total"] == 501 and report["demo"]["steps"] == 3
    assert all(
        g["met"] is None and g["note"] == "dry run on CPU: not judged" for g in report["goals"].values()
    )
    assert report["environment"]["device"] == "cpu" and report["environment"]["packages"]["deepspeed"]


# --------------------------------------------------------------------------------------- the clock


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    log = tmp_path / "log"
    started = time.monotonic()
    with open(log, "w") as sink:  # a shell whose child sleeps: both must go
        code = check.run_bounded(["bash", "-c", "sleep 60 & wait"], sink, dict(os.environ), limit=1)
    assert code is None and time.monotonic() - started < 30
    with open(log, "w") as sink:
        assert check.run_bounded(["bash", "-c", "exit 3"], sink, dict(os.environ), limit=30) == 3


def test_steps_share_the_deadline(tmp_path):
    run = check.Check(tmp_path, dry_run=False, python=sys.executable)
    run.scratch.rmdir()  # made empty; this test runs nothing there
    assert run.left("pytest") == check.CAPS["pytest"][0]
    run.step("pytest").seconds = 100.0  # its earlier commands took 100 s of its cap
    assert run.left("pytest") == check.CAPS["pytest"][0] - 100
    run.started -= check.DEADLINE_S - 10  # ten seconds before the deadline
    assert run.left("summary") <= 10 and run.left("demo") < 0
    assert run.run("demo", ["true"], tmp_path / "demo.log") is False
    assert run.steps["demo"].status == "skipped" and "deadline" in run.steps["demo"].reason


# --------------------------------------------------------------------------------------- the goals


def throughput_json(span_rate: float, crf_rate: float) -> dict:
    def run(head, rate, step):
        return {"dtype": "bf16", "head": head, "samples_per_s": rate, "real_tokens_per_s": rate * 200,
                "step_time_median_s": step, "peak_memory_bytes": 2**30, "mfu": 0.5}  # fmt: skip

    stores = {
        "384": {"windows": 1100, "examples": 1000, "tokens": 0},
        "512": {"windows": 1000, "examples": 1000, "tokens": 250_000},
    }
    return {
        "runs": [run("span", span_rate, 0.100), run("crf", crf_rate, 0.104)],
        "skipped": [],
        "stores": stores,
    }


def test_projections_are_arithmetic_on_the_measured_rates():
    found = summary.projections(throughput_json(span_rate=2200.0, crf_rate=1100.0))
    assert found["windows_per_question_384"] == pytest.approx(1.1)
    # 50,000 questions x 6 epochs x 1.1 windows = 330,000 windows; at 2,200/s: 150 s
    assert found["reference_run_minutes_span"] == pytest.approx(2.5)
    assert found["reference_run_minutes_crf"] == pytest.approx(5.0)
    assert found["reference_run_speedup_span"] == pytest.approx(252 / 2.5)
    # 130,319 questions x 4 epochs x 250 tokens at 440,000 tokens/s
    assert found["spanbert_recipe_minutes_span"] == pytest.approx(130_319 * 4 * 250 / 440_000 / 60)


def test_goals_are_judged_from_the_figures_and_only_on_a_gpu():
    crf_rows = [
        {"case": "B32xT384xK3", "device": "cuda", "fwd_bwd_speedup": 150.0, "fwd_bwd_speedup_vs_scan": 8.0}
    ]
    tp = throughput_json(span_rate=2200.0, crf_rate=1100.0)
    measured = summary.goal_figures(crf_rows, summary.throughput_figures(tp), summary.projections(tp))
    assert measured["crf_head_step_overhead_bf16"] == pytest.approx(0.04)
    goals = summary.judge(measured, dry_run=False)
    assert {k: g["met"] for k, g in goals.items()} == {
        "mfu_bf16_span": True, "crf_fwd_bwd_vs_torch_scan": False, "crf_fwd_bwd_vs_pytorch_crf": True,
        "crf_head_step_overhead_bf16": True, "reference_run_minutes_span": True,
        "reference_run_minutes_crf": False,
    }  # fmt: skip
    missing = summary.judge({**measured, "mfu_bf16_span": None}, dry_run=False)["mfu_bf16_span"]
    assert missing["met"] is None and missing["note"] == "not measured"
    assert all(g["met"] is None for g in summary.judge(measured, dry_run=True).values())


# --------------------------------------------------------------------------------------- the wheels


def test_every_wheel_is_pinned_and_says_why():
    for requirement, why in wheels.WHEELS + wheels.TRANSFORMERS_4:
        assert "==" in requirement and len(why) > 10, requirement


def test_transformers_4_travels_only_while_spanqa_excludes_the_images():
    def pyproject(spec: str) -> dict:
        return {"project": {"dependencies": ["torch>=2.4", f"transformers{spec}"]}}

    assert wheels.wanted_wheels(pyproject(">=4.44,<5")) == wheels.WHEELS + wheels.TRANSFORMERS_4
    assert wheels.wanted_wheels(pyproject(">=4.56,<6")) == wheels.WHEELS


def test_unmet_requirements_name_who_needs_what():
    from packaging.requirements import Requirement

    image = {"numpy": "2.5.2", "protobuf": None}
    needs = [("a.whl", Requirement(r)) for r in ("numpy>=2", "protobuf>=5", "pydantic>=2", "mlflow>=2.14")]
    needs += [("b.whl", Requirement("numpy<2")), ("c.whl", Requirement("google-auth~=2.0"))]
    problems = wheels.unmet_requirements({"mlflow-skinny": "3.17.2"}, needs, image)
    assert problems == [
        "a.whl needs pydantic>=2: neither carried nor in the image",
        "b.whl needs numpy<2: 2.5.2 is in the image",
    ]


@pytest.mark.slow
def test_the_cut_minilm_tokenizes_and_encodes_the_bundled_texts_as_the_full_one(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from spanqa.testing import minilm_dir

    minilm = load("gpu_minilm")
    done = minilm.write_cut_model(tmp_path / "minilm")
    assert done["vocab"] < done["of"] / 2 and done["bytes"] < 35e6
    texts = minilm.bundled_texts()[:40]
    full, cut = (AutoTokenizer.from_pretrained(str(p)) for p in (minilm_dir(), tmp_path / "minilm"))
    kept = minilm.kept_ids(full, minilm.bundled_texts())
    a, b = full(texts, padding=True, return_tensors="pt"), cut(texts, padding=True, return_tensors="pt")
    lookup = torch.full((len(full),), -1, dtype=torch.long)  # old id -> new id
    lookup[torch.tensor(kept)] = torch.arange(len(kept))
    assert torch.equal(lookup[a["input_ids"]], b["input_ids"])
    with torch.no_grad():
        hidden = [
            AutoModel.from_pretrained(str(p), dtype=torch.float32).eval()(**enc).last_hidden_state
            for p, enc in ((minilm_dir(), a), (tmp_path / "minilm", b))
        ]
    mask = a["attention_mask"].bool()
    torch.testing.assert_close(hidden[1][mask], hidden[0][mask], rtol=0, atol=2e-2)  # fp16 weights


def test_only_names_real_steps(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        check.main([str(tmp_path / "out"), "--only", "pytest,bogus"])
    assert stop.value.code == 2 and "--only: no step bogus" in capsys.readouterr().err
