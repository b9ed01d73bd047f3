"""`spanqa compare TAG` on runs logged with the tracker into a temporary SQLite store."""

from __future__ import annotations

import json

import pytest

from spanqa.cli import main as cli_main
from spanqa.train.compare import format_table, summarize
from spanqa.train.tracking import make_tracker


def log_run(out, head: str, tag: str, evals: list[dict], samples_per_s: list[float], seconds: float) -> str:
    """A run shaped like the trainer's: config params, per-step throughput, per-eval scores."""
    tracker = make_tracker(0, out, run_name=f"{head}-run", tags={"spanqa.tag": tag})
    tracker.log_params({"config": {"head": head, "eval_metric": "f1"}})
    for step, value in enumerate(samples_per_s, 1):
        tracker.log_metrics({"loss": 1.0 / step, "samples_per_s": value}, step=step)
    for step, scores in enumerate(evals, 1):
        tracker.log_metrics(scores, step=10 * step)
    tracker.log_metrics({"train_seconds": seconds}, step=10 * len(evals))
    tracker.close()
    return tracker.run_id


def scores(exact, f1, has, no, best):
    return {"exact": exact, "f1": f1, "HasAns_f1": has, "NoAns_f1": no, "best_f1": best}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "compare-test")
    # The CRF run peaks at its first evaluation: compare must report that one, not the last.
    crf = log_run(
        root / "crf",
        "crf",
        "cmp",
        [scores(64.0, 67.5, 60.0, 75.0, 68.0), scores(63.0, 66.0, 59.0, 73.0, 67.0)],
        [90.0, 110.0],
        3600 * 9 + 27 * 60,
    )
    span = log_run(
        root / "span",
        "span",
        "cmp",
        [scores(60.0, 63.0, 55.0, 71.0, 64.0), scores(62.4, 65.1, 58.0, 72.2, 66.0)],
        [200.0, 220.0, 240.0],
        3600 * 4 + 12 * 60,
    )
    log_run(root / "other", "span", "other-tag", [scores(1, 1, 1, 1, 1)], [1.0], 1.0)
    mp.undo()
    yield {"uri": uri, "crf": crf, "span": span}


def test_compare_json_reports_each_run_at_its_best_evaluation(store, capsys):
    assert cli_main(["compare", "cmp", "--tracking_uri", store["uri"], "--json"]) == 0
    output = capsys.readouterr()
    result = json.loads(output.out.strip().splitlines()[-1])
    runs = result["runs"]
    # these runs logged no predictions: the side-by-side table only, and the reason on stderr
    assert result["comparison"] is None
    assert "no paired comparison: run " in output.err and "logged no data/dev/meta.json" in output.err
    assert [r["head"] for r in runs] == ["crf", "span"]
    crf, span = runs
    assert crf["run_id"] == store["crf"] and span["run_id"] == store["span"]
    assert (crf["best_step"], crf["exact"], crf["f1"], crf["HasAns_f1"], crf["NoAns_f1"], crf["best_f1"]) == (
        10,
        64.0,
        67.5,
        60.0,
        75.0,
        68.0,
    )
    assert (span["best_step"], span["exact"], span["f1"]) == (20, 62.4, 65.1)
    assert crf["train_seconds"] == 3600 * 9 + 27 * 60
    assert crf["samples_per_s"] == pytest.approx(100.0)
    assert span["samples_per_s"] == pytest.approx(220.0)


def test_compare_table_puts_runs_side_by_side(store, capsys):
    assert cli_main(["compare", "cmp", "--tracking_uri", store["uri"], "--experiment", "compare-test"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[1:]}
    assert rows["head"] == ["crf", "span"]
    assert rows["EM"] == ["64.00", "62.40"]
    assert rows["F1"] == ["67.50", "65.10"]
    assert rows["train time"] == ["9:27:00", "4:12:00"]
    assert rows["samples/s"] == ["100.0", "220.0"]


def test_unknown_tag_is_a_one_line_error(store, capsys):
    assert cli_main(["compare", "nope", "--tracking_uri", store["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spanqa compare: error: TAG: no MLflow run has tag spanqa.tag = 'nope'")
    assert "\n" not in err


def test_missing_store_and_experiment_are_one_line_errors(store, tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli_main(["compare", "cmp", "--tracking_uri", missing]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert cli_main(["compare", "cmp", "--tracking_uri", store["uri"], "--experiment", "nope"]) == 2
    assert "--experiment: no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_run_without_evaluation_shows_dashes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = make_tracker(0, tmp_path / "out", tags={"spanqa.tag": "t"})
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.close()
    client = MlflowClient(uri)
    summary = summarize(client, client.get_run(tracker.run_id))
    assert summary.exact is None and summary.best_step is None and summary.train_seconds is not None
    table = format_table([summary])
    assert "EM" in table and table.count(" -") >= 6
