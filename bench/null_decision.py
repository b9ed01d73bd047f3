"""How a trained CRF head decides "no answer": the rules side by side on one model's dev windows.

Every window gives the exact log p(no answer) and log p(span) of its spans (spanqa.eval.crf_spans).
A question's answer is its best span over its windows; the rules differ in the null odds it is
compared with (answered when the odds are <= 0; best_f1 sweeps the threshold):

- best span:  min over windows of log p(no answer) - max over windows of log p(best span)
              (the span head's rule: its null score is the CLS score, its spans start + end)
- any span:   min over windows of log p(no answer) - max over windows of log p(some answer), where
              p(some answer) = 1 - p(no answer) sums over every span the window could hold; the
              answer is the best span of the window most sure it holds one

    python bench/null_decision.py --model RUN/best_model --dev_file dev.json [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

RULES = ("best span", "any span")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a CRF model exported by training (best_model/)")
    parser.add_argument("--dev_file", required=True, help="SQuAD v2 JSON with gold answers")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    return parser.parse_args(argv)


def window_scores(model, store, info, batch_size: int):
    """Per window: the top candidates (WindowCandidates, log p(span)) and log p(some answer)."""
    from spanqa.data.loader import eval_batches, make_loader
    from spanqa.eval.candidates import WindowCandidates
    from spanqa.eval.crf_spans import crf_candidates
    from spanqa.eval.infer import MODEL_INPUTS

    answers, head = info.answers, model.head
    parts, answer_lp, indices = [], [], []
    loader = make_loader(store, eval_batches(store.window_lengths, batch_size))
    with torch.inference_mode():
        for batch in loader:
            outputs = model(**{name: batch[name] for name in MODEL_INPUTS})
            cands = crf_candidates(
                head.crf,
                outputs["emissions"],
                batch["context_mask"],
                answers.n_best_size,
                answers.max_answer_length,
                head.tagging.states,
            )
            parts.append(cands)
            null = torch.from_numpy(cands.null_scores).double()
            answer_lp.append(torch.log(-torch.expm1(null)).numpy())  # log(1 - p(no answer))
            indices.append(batch["window_index"].numpy())
    return WindowCandidates.concatenate(parts), np.concatenate(answer_lp), np.concatenate(indices)


def any_span_candidates(cands, answer_lp: np.ndarray):
    """The same spans, each window's shifted so that its best one scores log p(some answer)."""
    from spanqa.eval.candidates import WindowCandidates

    with np.errstate(invalid="ignore"):
        shift = np.where(np.isfinite(cands.scores[:, :1]), answer_lp[:, None] - cands.scores[:, :1], 0.0)
    return WindowCandidates(
        scores=(cands.scores + shift).astype(np.float32),
        starts=cands.starts,
        ends=cands.ends,
        null_scores=cands.null_scores,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from spanqa.data.prepare import prepare
    from spanqa.eval.postprocess import select_answers
    from spanqa.eval.squad_metric import read_gold_questions, squad_v2_scores
    from spanqa.export import load_export

    model, tokenizer, info = load_export(args.model)
    if info.head != "crf":
        raise SystemExit(f"{args.model}: a {info.head} head; this compares the CRF head's rules")
    golds = read_gold_questions(args.dev_file)
    results = {}
    with tempfile.TemporaryDirectory(prefix="spanqa-null-") as tmp:
        store = prepare(args.dev_file, tokenizer, Path(tmp) / "dev", info.windows, progress=False)
        cands, answer_lp, indices = window_scores(model, store, info, args.batch_size)
        for rule, rule_cands in zip(RULES, (cands, any_span_candidates(cands, answer_lp)), strict=True):
            predictions, odds = select_answers(rule_cands, indices, store, 0.0)
            scores = squad_v2_scores(golds, predictions, odds, null_threshold=0.0)
            scores["answered"] = sum(1 for p in predictions.values() if p)
            results[rule] = scores
    print(f"{args.model} ({model.head.tagging.name} tags) on {args.dev_file}, {len(golds)} questions")
    print(f"{'rule':<10}{'EM':>8}{'F1':>8}{'HasAns F1':>11}{'NoAns F1':>10}{'best_f1':>9}{'answered':>10}")
    for rule, s in results.items():
        print(
            f"{rule:<10}{s['exact']:>8.2f}{s['f1']:>8.2f}{s['HasAns_f1']:>11.2f}{s['NoAns_f1']:>10.2f}"
            f"{s['best_f1']:>9.2f}{s['answered']:>10}"
        )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
