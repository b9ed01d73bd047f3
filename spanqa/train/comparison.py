"""The paired comparison behind `spanqa compare`: for every pair of entries (runs, or heads with several
seeds each), the difference in EM and F1 (all questions, HasAns, NoAns) with a paired bootstrap interval
and p-value, how often the two agree, and each run's breakdowns.

An entry with several runs (one head, several seeds) is scored per question by the mean over its runs;
its runs' own figures give the mean ± sample standard deviation (ddof 1) across seeds, and the
bootstrap resamples questions of the per-question seed means.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from spanqa.eval.bootstrap import agreement, paired_bootstrap
from spanqa.eval.breakdown import breakdown, format_breakdowns
from spanqa.train.run_evals import RunEval

SUBSETS = ("all", "HasAns", "NoAns")
FIGURES = (("exact", "EM"), ("f1", "F1"))


@dataclass(frozen=True)
class Entry:
    label: str
    runs: list[RunEval]

    def mean_scores(self, key: str) -> np.ndarray:
        return np.mean([getattr(run.scores, key) for run in self.runs], axis=0)


def entries_by_head(runs: list[RunEval]) -> list[Entry]:
    heads: dict[str, list[RunEval]] = {}
    for run in runs:
        heads.setdefault(run.head or run.label, []).append(run)
    # each head's runs in seed order, whatever order they finished in
    return [Entry(head, sorted(members, key=_seed_order)) for head, members in heads.items()]


def _seed_order(run: RunEval) -> tuple:
    seed = run.seed or ""
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def entries_by_run(runs: list[RunEval]) -> list[Entry]:
    return [
        Entry(run.label if [r.label for r in runs].count(run.label) == 1 else run.run_id[:8], [run])
        for run in runs
    ]


def seed_summary(entry: Entry) -> dict:
    """Mean and sample std over the entry's runs of their EM and F1 (%)."""
    out: dict[str, Any] = {"runs": len(entry.runs), "seeds": [run.seed for run in entry.runs]}
    for key in ("exact", "f1"):
        values = np.array([100 * getattr(run.scores, key).mean() for run in entry.runs])
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        }
    return out


def compare_pair(a: Entry, b: Entry, resamples: int, seed: int) -> dict:
    has_answer = a.runs[0].scores.has_answer
    out: dict[str, Any] = {"a": a.label, "b": b.label}
    for subset in SUBSETS:
        rows = {"all": np.ones_like(has_answer), "HasAns": has_answer, "NoAns": ~has_answer}[subset]
        if rows.any():
            out[subset] = {
                key: paired_bootstrap(
                    a.mean_scores(key)[rows], b.mean_scores(key)[rows], resamples, seed
                ).as_dict()
                for key in ("exact", "f1")
            }
    out["agreement"] = float(np.mean([agreement(x.answers, y.answers) for x in a.runs for y in b.runs]))
    ea, eb = a.mean_scores("exact"), b.mean_scores("exact")
    out["exact_cells"] = {  # for single runs: the 2x2 table of EM right/wrong
        "both right": float(np.mean(ea * eb)),
        f"only {a.label}": float(np.mean(ea * (1 - eb))),
        f"only {b.label}": float(np.mean((1 - ea) * eb)),
        "both wrong": float(np.mean((1 - ea) * (1 - eb))),
    }
    return out


def compare_entries(entries: list[Entry], buckets: dict[str, dict], resamples: int, seed: int) -> dict:
    """Everything `spanqa compare` reports beyond the side-by-side table; `buckets` maps a run id to its
    questions' buckets (spanqa.eval.breakdown.question_buckets)."""
    ids = entries[0].runs[0].scores.ids
    for entry in entries:
        for run in entry.runs:
            if run.scores.ids != ids:
                raise ValueError("runs scored on different questions")
    return {
        "questions": len(ids),
        "resamples": resamples,
        "seed": seed,
        "confidence": 0.95,
        "entries": {e.label: {**seed_summary(e), "run_ids": [r.run_id for r in e.runs]} for e in entries},
        "pairs": [compare_pair(a, b, resamples, seed) for a, b in combinations(entries, 2)],
        "breakdowns": {
            run.label: breakdown(buckets[run.run_id], run.scores.exact, run.scores.f1)
            for entry in entries
            for run in entry.runs
        },
    }


def _interval(result: dict) -> str:
    return (
        f"{100 * result['difference']:+6.2f} [{100 * result['low']:+6.2f}, {100 * result['high']:+6.2f}]"
        f" p {_p(result['p_value'])}"
    )


def _p(value: float) -> str:
    # the smallest p of B resamples is 1 / (B + 1): never print it as 0
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _seed_line(label: str, entry: dict) -> str:
    seeds = ", ".join(str(s) for s in entry["seeds"])
    figures = ", ".join(f"{name} {entry[k]['mean']:.2f} ± {entry[k]['std']:.2f}" for k, name in FIGURES)
    return f"{label}: {entry['runs']} runs (seeds {seeds}): {figures}"


def format_comparison(result: dict, where: str) -> str:
    lines = [
        f"paired comparison of {where}, {result['questions']} questions:",
        f"paired bootstrap over questions, {result['resamples']:,} resamples, seed {result['seed']}; "
        "95% percentile intervals; two-sided p",
    ]
    lines += [_seed_line(label, e) for label, e in result["entries"].items() if e["runs"] > 1]
    lines.append(f"{'difference (points)':<22}{'EM [95% CI]':<38}F1 [95% CI]")
    for pair in result["pairs"]:
        lines.append(f"{pair['a']} - {pair['b']}")
        for subset in (s for s in SUBSETS if s in pair):
            em, f1 = pair[subset]["exact"], pair[subset]["f1"]
            name = f"{subset} ({em['questions']})"
            lines.append(f"  {name:<20}{_interval(em):<38}{_interval(f1)}")
        cells = ", ".join(f"{name} {100 * share:.1f}%" for name, share in pair["exact_cells"].items())
        lines.append(f"  same answer on {100 * pair['agreement']:.1f}% of questions; EM: {cells}")
    lines += ["", "breakdowns (EM / F1, %):", format_breakdowns(result["breakdowns"])]
    return "\n".join(lines)
