"""The CRF head's null decision, screened: which question-level null odds rank "no answer" best.

A CRF window gives log p(no answer) and log p(span) for every span, under one distribution. spanqa's null
odds (spanqa.eval.postprocess, as for the span head) are the lowest null score over a question's windows
minus its best span's score. The alternatives set the null against all of a window's answers at once,
the CRF's marginal p(some answer) = 1 - p(no answer), or against the top spans' summed probability, or
take one side alone (the null's probability, or the best span's). The answers stay the same (the best
span); only the null odds change, and with them best_f1 and best_exact, found by the official threshold
sweep, and the odds' AUC (how well they rank the unanswerable questions above the others; 0.5 is a coin).

    python bench/crf_null_odds.py MODEL_DIR DEV_JSON     # e.g. OUT/crf/best_model OUT/data/dev.json
(MODEL_DIR: a CRF export, `best_model/` of a run such as bench/accuracy.py's.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def candidates(model_dir: str, dev: str, work: Path):
    from spanqa.data.prepare import prepare
    from spanqa.export import load_export
    from spanqa.predict import run_windows

    model, tokenizer, info = load_export(model_dir)
    if model.head_name != "crf":
        raise SystemExit(f"bench/crf_null_odds.py: {model_dir} has the {model.head_name} head, not crf")
    store = prepare(dev, tokenizer, work / "store", info.windows, progress=False)
    inferred = run_windows(model, store, info, batch_size=64, device="cpu")  # spanqa predict's own loop
    return store, inferred.candidates, inferred.window_indices


def variants(store, cands, window_indices) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The answers, and each variant's null odds by question id."""
    from spanqa.eval.postprocess import select_answers

    examples = store.examples()
    owner = np.asarray(store.example_index[window_indices], dtype=np.int64)
    predictions, current = select_answers(cands, window_indices, store, null_threshold=0.0)
    null = cands.null_scores.astype(np.float64)  # log p(no answer) of each window
    some_answer = np.log(-np.expm1(np.minimum(null, -1e-12)))  # log(1 - p(no answer))
    top_spans = np.logaddexp.reduce(cands.scores.astype(np.float64), axis=1)

    def lowest(values):
        out = np.full(len(examples), np.inf)
        np.minimum.at(out, owner, values)
        return out

    def highest(values):
        out = np.full(len(examples), -np.inf)
        np.maximum.at(out, owner, values)
        return out

    ids = [e.id for e in examples]

    def by_id(values) -> dict[str, float]:
        return dict(zip(ids, values.tolist(), strict=True))

    return predictions, {
        "min null - best span (spanqa's)": current,
        "min over windows of log-odds null : some answer": by_id(lowest(null - some_answer)),
        "min null - max log p(some answer)": by_id(lowest(null) - highest(some_answer)),
        "min null - max log p(top spans summed)": by_id(lowest(null) - highest(top_spans)),
        "min null alone": by_id(lowest(null)),
        "- max log p(best span) alone": by_id(-highest(cands.scores[:, 0].astype(np.float64))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("dev_json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from spanqa.eval.squad_metric import null_odds_auc, read_gold_questions, squad_v2_scores, unique_by_id

    with tempfile.TemporaryDirectory(prefix="spanqa-crf-null-") as work:
        store, cands, window_indices = candidates(args.model_dir, args.dev_json, Path(work))
        predictions, odds_by_variant = variants(store, cands, window_indices)
    golds = read_gold_questions(args.dev_json)
    questions = unique_by_id(golds)
    print(f"{'null odds':<50}{'best_f1':>9}{'best_exact':>11}{'threshold':>10}{'AUC':>7}")
    for name, odds in odds_by_variant.items():
        r = squad_v2_scores(golds, predictions, odds, null_threshold=0.0)
        auc = null_odds_auc(questions, odds)
        print(
            f"{name:<50}{r['best_f1']:>9.2f}{r['best_exact']:>11.2f}{r['best_f1_thresh']:>10.3f}{auc:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
