"""`spanqa compare`'s paired half on real MLflow runs (a temporary SQLite store) that logged what training
logs: params, eval/predictions.json, eval/null_odds.json, eval/eval_report.json and data/dev/meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spanqa.cli import main as cli
from spanqa.data.prepare import file_sha256
from spanqa.eval.evaluate import write_prediction_files
from spanqa.eval.golds import read_golds
from spanqa.eval.scoring import score_predictions
from spanqa.testing import minilm_dir
from spanqa.train.tracking import make_tracker

DEV = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
GOLDS = read_golds(DEV).questions
ANSWERABLE = [g.id for g in GOLDS if g.has_answer]
N, N_HAS = len(GOLDS), len(ANSWERABLE)


def predictions(wrong: list[str]) -> tuple[dict, dict]:
    """Right on every question except `wrong` (answered "zzz"); unanswerable ones are thresholded to ""."""
    preds = {g.id: (g.answers[0] if g.has_answer else "") for g in GOLDS}
    preds.update({qid: "zzz" for qid in wrong})
    odds = {g.id: (-1.0 if g.has_answer else 1.0) for g in GOLDS}
    return preds, odds


def log_run(root: Path, tag: str, head: str, seed: int, wrong: list[str] | None) -> str:
    out = root / f"{tag}-{head}-{seed}"
    tracker = make_tracker(0, out, run_name=f"{head}-{seed}", tags={"spanqa.tag": tag})
    windows = {"max_seq_length": 128, "doc_stride": None, "doc_overlap": 32, "max_query_length": 32}
    answers = {"version_2_with_negative": True, "null_score_diff_threshold": 0.0}
    config = {"head": head, "seed": seed, "eval_metric": "best_f1", "model": str(minilm_dir())}
    tracker.log_params({"config": {**config, "windows": windows, "answers": answers}})
    meta = out / "dev" / "meta.json"
    meta.parent.mkdir(parents=True)
    source = {"path": str(DEV), "sha256": file_sha256(DEV), "format": "squad", "metric": "squad-v2.0"}
    meta.write_text(json.dumps({"source": source}))
    tracker.log_artifact(meta, "data/dev")
    if wrong is not None:
        preds, odds = predictions(wrong)
        report = score_predictions(GOLDS, preds, odds, 0.0)
        tracker.log_metrics({k: v for k, v in report.items() if isinstance(v, float)}, step=10)
        for file in write_prediction_files(out / "eval", preds, odds, {**report, "step": 10}).values():
            tracker.log_artifact(file, "eval")
    tracker.close()
    return tracker.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-paired")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    runs = {
        "span": log_run(root, "heads", "span", 1, []),
        "crf": log_run(root, "heads", "crf", 1, ANSWERABLE[:6]),
        "span2": log_run(root, "seeds", "span", 1, []),
        "span3": log_run(root, "seeds", "span", 2, ANSWERABLE[:2]),
        "crf2": log_run(root, "seeds", "crf", 1, ANSWERABLE[:6]),
        "crf3": log_run(root, "seeds", "crf", 2, ANSWERABLE[:6]),
        "same": log_run(root, "same", "span", 3, []),
        "bare": log_run(root, "bare", "span", 1, None),
    }
    mp.undo()
    yield {"uri": f"sqlite:///{root / 'mlflow.db'}", "root": root, **runs}


def compare(capsys, store, *argv):
    code = cli(["compare", *argv, "--tracking_uri", store["uri"], "--resamples", "2000"])
    out, err = capsys.readouterr()
    return code, out, err


def test_two_heads_that_differ_on_known_questions(store, capsys, tmp_path):
    code, out, err = compare(capsys, store, "heads", "--json", "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    result = json.loads(out)["comparison"]
    assert result is not None, err
    (pair,) = result["pairs"]
    assert (pair["a"], pair["b"]) == ("crf", "span")  # the table's order: by head
    assert pair["all"]["exact"]["difference"] == pytest.approx(-6 / N)
    assert pair["HasAns"]["exact"]["difference"] == pytest.approx(-6 / N_HAS)
    assert pair["HasAns"]["f1"]["difference"] == pytest.approx(-6 / N_HAS)  # "zzz" shares no token
    no_answer = pair["NoAns"]["exact"]
    assert (no_answer["difference"], no_answer["low"], no_answer["high"], no_answer["p_value"]) == (
        0,
        0,
        0,
        1,
    )
    assert pair["all"]["exact"]["low"] <= -6 / N <= pair["all"]["exact"]["high"] <= 0
    assert pair["agreement"] == pytest.approx((N - 6) / N)
    assert pair["exact_cells"]["only span"] == pytest.approx(6 / N) and pair["exact_cells"]["only crf"] == 0
    assert (result["resamples"], result["seed"], result["questions"]) == (2000, 0, N)
    span = result["breakdowns"]["span-1"]
    assert span["answerable"]["HasAns"] == {"n": N_HAS, "exact": 100.0, "f1": 100.0}
    assert sum(row["n"] for row in span["question word"].values()) == N
    assert sum(row["n"] for row in span["windows"].values()) == N and "2" in span["windows"]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "breakdown.png",
        "compare.json",
        "compare.txt",
    ]
    assert (tmp_path / "cmp" / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
    from mlflow import MlflowClient

    client = MlflowClient(store["uri"])
    for run in ("span", "crf"):
        logged = sorted(Path(a.path).name for a in client.list_artifacts(store[run], "compare/heads"))
        assert logged == ["breakdown.png", "compare.json", "compare.txt"]


def test_the_text_shows_differences_with_intervals(store, capsys):
    code, out, _ = compare(capsys, store, "heads")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("runs tagged spanqa.tag = 'heads'")
    start = lines.index("crf - span")
    assert lines[start + 1].split()[:3] == ["all", f"({N})", f"{-600 / N:+.2f}"]
    assert " p " in lines[start + 1] and lines[start + 3].split()[:2] == ["NoAns", f"({N - N_HAS})"]
    assert "+0.00 [ +0.00,  +0.00] p 1.000" in lines[start + 3]
    assert lines[start + 4].startswith(f"  same answer on {100 * (N - 6) / N:.1f}% of questions")
    assert "breakdowns (EM / F1, %):" in lines and any(line.startswith("what ") for line in lines)
    again = compare(capsys, store, "heads")[1]
    assert again == out  # exact and reproducible


def test_several_seeds_per_head_give_mean_and_std_and_compare_seed_means(store, capsys):
    code, out, err = compare(capsys, store, "seeds", "--json")
    assert code == 0, err
    result = json.loads(out)["comparison"]
    span = result["entries"]["span"]
    ems = np.array([100.0, 100 * (N - 2) / N])
    assert span["runs"] == 2 and sorted(span["seeds"]) == ["1", "2"]
    assert span["exact"]["mean"] == pytest.approx(ems.mean()) and span["exact"]["std"] == pytest.approx(
        ems.std(ddof=1)
    )
    assert result["entries"]["crf"]["exact"]["std"] == 0
    (pair,) = result["pairs"]
    # per question, span's seed mean is 1 except 0.5 on two questions; crf's is 0 on six
    assert pair["all"]["exact"]["difference"] == pytest.approx((-6 + 2 * 0.5) / N)
    assert len(result["breakdowns"]) == 4


def test_identical_runs_differ_by_nothing(store, capsys):
    code, out, _ = compare(capsys, store, "--runs", store["span"], store["same"], "--json")
    assert code == 0
    (pair,) = json.loads(out)["comparison"]["pairs"]
    for subset in ("all", "HasAns", "NoAns"):
        for key in ("exact", "f1"):
            r = pair[subset][key]
            assert r["difference"] == 0 and r["low"] <= 0 <= r["high"] and r["p_value"] == 1
    assert pair["agreement"] == 1


def test_runs_that_cannot_be_paired(store, capsys, tmp_path):
    code, _, err = compare(capsys, store, "--runs", store["span"], store["bare"])
    assert code == 2 and err.count("\n") == 1
    assert f"run {store['bare']}: logged no eval/predictions.json" in err
    other = tmp_path / "other.json"
    other.write_text(DEV.read_text() + "\n")
    code, _, err = compare(capsys, store, "--runs", store["span"], store["crf"], "--data_file", str(other))
    assert code == 2 and "not the file the runs were evaluated on (sha256 differs)" in err
    code, _, err = compare(capsys, store, "--runs", store["span"], "nope")
    assert code == 2 and "--runs: no MLflow run 'nope'" in err
    code, _, err = compare(capsys, store, "heads", "--runs", store["span"])
    assert code == 2 and "give a TAG or --runs" in err


def test_breakdown_columns_of_runs_named_alike_stay_apart():
    from spanqa.eval.breakdown import format_breakdowns

    cell = {"n": 1, "exact": 100.0, "f1": 100.0}
    names = ("bench/accuracy.py crf", "bench/accuracy.py span")
    by_run = {name: {"answerable": {"HasAns": cell}} for name in names}
    header = format_breakdowns(by_run).splitlines()[0]
    assert header.split()[2:] == ["…h/accuracy.py", "crf", "…/accuracy.py", "span"], header
