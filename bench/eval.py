"""Post-processing + the official metric over a whole dev set, against a per-question Python loop.

    .venv/bin/python bench/eval.py [--data_file ../shared/data/squad2/dev-v2.0.json] [--json]
    .venv/bin/python bench/eval.py --mrqa 17000 --max_seq_length 512 --json   # ~50k windows of long contexts

Prepares the data file into a window store (MiniLM tokenizer, 384/128; cached under the temp dir and
reused), draws random start/end logits for every window (fixed seed), then times, on the same logits:
  vectorised  spanqa.eval.candidates.span_candidates + postprocess.select_answers (numpy, all windows)
  loop        transformers' run_qa postprocess_qa_predictions: for each question, for each of its windows,
              argsort the context logits, try the n_best starts × n_best ends in Python, keep a dict
              per valid pair, sort, cut the n_best texts
  lean        the same search with every Python shortcut (plain floats, only the best span kept)
and checks that the vectorised and run_qa-style answers are identical (exit 1 if not; the lean loop's
differences, possible on float32 near-ties, are only counted). The data file's official metric
(score_predictions) is timed on the result. Timings are the median of --repeat runs, wall and CPU (the
CPU figure is the steadier one on a shared machine). With --json the last line is a JSON object;
`speedup_vs_loop` is the run_qa-style loop's wall time over the vectorised one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spanqa import flags  # noqa: E402
from spanqa.data.prepare import prepare  # noqa: E402
from spanqa.data.windows import WindowSettings  # noqa: E402
from spanqa.eval.candidates import span_candidates  # noqa: E402
from spanqa.eval.golds import read_golds  # noqa: E402
from spanqa.eval.postprocess import select_answers  # noqa: E402
from spanqa.eval.scoring import score_predictions  # noqa: E402
from spanqa.testing import minilm_dir, shared_squad2  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data_file", default=str(shared_squad2("dev-v2.0.json")))
    parser.add_argument("--store", help="window store dir (default: under the temp dir, reused)")
    flags.add_flags(parser, WindowSettings)
    parser.add_argument("--n_best", type=int, default=20)
    parser.add_argument("--max_answer_length", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--mrqa", type=int, metavar="N", help="a synthetic MRQA file of N long contexts (bench/synthetic.py)"
    )
    return parser.parse_args(argv)


def random_logits(store, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded [n_windows, L] start/end logits (float32, like a model's) and the context mask."""
    n, length = len(store), int(store.window_lengths.max())
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(n, length)).astype(np.float32)
    end = rng.normal(size=(n, length)).astype(np.float32)
    positions = np.arange(length)
    mask = (positions >= store.context_start[:, None]) & (positions <= store.context_end[:, None])
    return start, end, mask


def vectorised(store, rows, order, n_best, max_answer_length):
    """`rows` are the logits in the order an evaluation produces them; row r is window order[r]."""
    cands = span_candidates(*rows, n_best, max_answer_length)
    return select_answers(cands, order, store, null_threshold=0.0)


def run_qa_loop(store, start, end, n_best, max_answer_length):
    """transformers' postprocess_qa_predictions, step for step, on the same logits.

    Per question and window: argsort the logits, try the n_best × n_best (start, end) pairs in Python,
    keep a candidate dict per valid pair, then sort the candidates and cut the texts of the n_best best.
    One change so that both sides answer alike: starts and ends are ranked among context tokens only.
    """
    examples = store.examples()
    windows_of = _windows_of(store, len(examples))
    predictions, null_odds = {}, {}
    for ex_i, example in enumerate(examples):
        prelim, min_null = [], None
        for w in windows_of[ex_i]:
            s_logits, e_logits = start[w], end[w]
            offsets = store.offsets(w).tolist()  # run_qa holds offset_mapping as Python lists
            cs, ce = int(store.context_start[w]), int(store.context_end[w])
            null = s_logits[0] + e_logits[0]
            if min_null is None or null < min_null:
                min_null = null
            start_indexes = (np.argsort(-s_logits[cs : ce + 1], kind="stable")[:n_best] + cs).tolist()
            end_indexes = (np.argsort(-e_logits[cs : ce + 1], kind="stable")[:n_best] + cs).tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    prelim.append(
                        {
                            "offsets": (offsets[s][0], offsets[e][1]),
                            "score": s_logits[s] + e_logits[e],
                            "start_logit": s_logits[s],
                            "end_logit": e_logits[e],
                        }
                    )
        nbest = sorted(prelim, key=lambda x: x["score"], reverse=True)[:n_best]
        for pred in nbest:
            pred["text"] = example.context[pred["offsets"][0] : pred["offsets"][1]]
        if not nbest:
            predictions[example.id], null_odds[example.id] = "", float("inf")
            continue
        odds = float(min_null) - float(nbest[0]["score"])
        null_odds[example.id] = odds
        predictions[example.id] = "" if odds > 0.0 else nbest[0]["text"]
    return predictions, null_odds


def lean_loop(store, start, end, n_best, max_answer_length):
    """The same search with every Python shortcut: plain floats, only the best span kept.

    It adds in float64, so on a near-tie that float32 rounding merges it may pick the other span.
    """
    examples = store.examples()
    windows_of = _windows_of(store, len(examples))
    predictions, null_odds = {}, {}
    for ex_i, example in enumerate(examples):
        best_score, best_span, min_null = -np.inf, None, np.inf
        for w in windows_of[ex_i]:
            cs, ce = int(store.context_start[w]), int(store.context_end[w])
            s_logits, e_logits = start[w].tolist(), end[w].tolist()
            min_null = min(min_null, s_logits[0] + e_logits[0])
            top_starts = (np.argsort(-start[w, cs : ce + 1], kind="stable")[:n_best] + cs).tolist()
            top_ends = (np.argsort(-end[w, cs : ce + 1], kind="stable")[:n_best] + cs).tolist()
            for s in top_starts:
                for e in top_ends:
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[e]
                    if score > best_score:
                        best_score, best_span = score, (w, s, e)
        if best_span is None:
            predictions[example.id], null_odds[example.id] = "", float("inf")
            continue
        w, s, e = best_span
        base = int(store.window_starts[w])
        text = example.context[int(store.char_offsets[base + s, 0]) : int(store.char_offsets[base + e, 1])]
        odds = float(np.float32(min_null)) - float(np.float32(best_score))
        null_odds[example.id] = odds
        predictions[example.id] = "" if odds > 0.0 else text
    return predictions, null_odds


def _windows_of(store, n_examples: int) -> list[list[int]]:
    windows_of: list[list[int]] = [[] for _ in range(n_examples)]
    for w, ex in enumerate(store.example_index.tolist()):
        windows_of[ex].append(w)
    return windows_of


def timed(fn: Callable, repeat: int, cpu: dict, name: str):
    """Median wall time of `repeat` runs; the median CPU time goes to cpu[name] (robust on a shared box)."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    cpu[name] = round(statistics.median(cpus), 4)
    return statistics.median(walls), result


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.mrqa:
        from synthetic import cached_mrqa_file

        args.data_file = str(cached_mrqa_file(args.mrqa))
    settings = flags.build_given(WindowSettings, args)
    store_dir = args.store or Path(tempfile.gettempdir()) / "spanqa-bench-eval" / (
        f"{Path(args.data_file).stem}-minilm-{'-'.join(str(v) for v in settings.as_dict().values())}"
    )
    t0 = time.perf_counter()
    store = prepare(args.data_file, str(minilm_dir()), store_dir, settings, progress=False)
    prepare_s = time.perf_counter() - t0
    golds = read_golds(args.data_file)
    store.examples()  # parsed once and cached: no timed side pays for reading examples.jsonl
    start, end, mask = random_logits(store, args.seed)
    # the eval loader yields windows sorted by length; the model's logits come out in that order
    order = np.argsort(store.window_lengths, kind="stable")
    rows = (start[order], end[order], mask[order])
    cpu: dict[str, float] = {}

    n_best, max_len = args.n_best, args.max_answer_length
    post_s, (preds, odds) = timed(
        lambda: vectorised(store, rows, order, n_best, max_len), args.repeat, cpu, "postprocess_cpu_s"
    )
    metric_s, report = timed(
        lambda: score_predictions(golds.questions, preds, odds, 1.0, golds.metric),
        args.repeat,
        cpu,
        "metric_cpu_s",
    )
    loop_s, (loop_preds, loop_odds) = timed(
        lambda: run_qa_loop(store, start, end, n_best, max_len), args.repeat, cpu, "loop_cpu_s"
    )
    lean_s, (lean_preds, _) = timed(
        lambda: lean_loop(store, start, end, n_best, max_len), args.repeat, cpu, "lean_loop_cpu_s"
    )
    differing = sum(preds[q] != loop_preds.get(q) for q in preds)
    lean_differing = sum(preds[q] != lean_preds.get(q) for q in preds)
    odds_gap = max(abs(odds[q] - loop_odds[q]) for q in odds if np.isfinite(odds[q]))
    result = {
        "questions": len(store.examples()),
        "windows": len(store),
        "prepare_s": round(prepare_s, 3),
        "postprocess_s": round(post_s, 4),
        "metric_s": round(metric_s, 4),
        "loop_s": round(loop_s, 4),
        "speedup_vs_loop": round(loop_s / post_s, 1),
        "lean_loop_s": round(lean_s, 4),
        "speedup_vs_lean_loop": round(lean_s / post_s, 1),
        **cpu,
        "speedup_vs_loop_cpu": round(cpu["loop_cpu_s"] / cpu["postprocess_cpu_s"], 1),
        "differing_predictions": differing,
        "lean_loop_differing": lean_differing,
        "max_null_odds_gap": odds_gap,
        "f1_random_logits": round(report["f1"], 3),
        "metric": golds.metric,
        "n_best": args.n_best,
        "max_answer_length": args.max_answer_length,
        "repeat": args.repeat,
    }
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0 if differing == 0 else 1


def print_table(r: dict) -> None:
    print(
        f"{r['questions']} questions, {r['windows']} windows (store ready in {r['prepare_s']:.1f} s), "
        f"n_best {r['n_best']}, max_answer_length {r['max_answer_length']}, median of {r['repeat']}"
    )
    rows = [
        ("post-process, vectorised (spanqa)", "postprocess"),
        ("post-process, run_qa-style loop", "loop"),
        ("post-process, lean Python loop", "lean_loop"),
        (f"{r['metric']} metric", "metric"),
    ]
    print(f"{'step':<36}{'wall s':>9}{'cpu s':>9}{'loop / this':>13}")
    for label, key in rows:
        wall, cpu = r[f"{key}_s"], r[f"{key}_cpu_s"]
        ratio = f"{r['loop_s'] / wall:.1f}x" if key != "metric" else ""
        print(f"{label:<36}{wall:>9.3f}{cpu:>9.3f}{ratio:>13}")
    print(
        f"same predictions as the run_qa-style loop: {r['differing_predictions'] == 0} "
        f"({r['differing_predictions']} differ; lean loop: {r['lean_loop_differing']}), "
        f"largest null-odds gap {r['max_null_odds_gap']:.2e}"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
