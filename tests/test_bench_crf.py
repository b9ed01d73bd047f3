"""bench/crf.py runs end to end and reports what the CRF issue asks for (the figures themselves are
measured by the benchmark, never asserted here: these machines are shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "crf.py"


def test_bench_prints_a_table_and_a_json_summary_of_both_cases():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--repeats", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert [row["case"] for row in summary["rows"]][:2] == ["B32xT384xK3", "B8xT384xK5"]
    for key in (
        "fwd_bwd_speedup",
        "viterbi_speedup",
        "fwd_bwd_speedup_after_other",
        "viterbi_speedup_after_other",
    ):
        assert summary[key] > 0
    main = summary["rows"][0]
    assert summary["viterbi_speedup"] == main["ref_viterbi_ms"] / main["viterbi_ms"]
    assert summary["goal_met"] == (
        min(summary["fwd_bwd_speedup"], summary["viterbi_speedup"]) >= summary["goal"]
    )
    assert any(line.startswith("B32xT384xK3") for line in lines) and "goal" in lines[-2]
