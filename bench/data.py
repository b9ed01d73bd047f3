"""Data pipeline benchmark: prepare time, loader throughput and padding efficiency.

    .venv/bin/python bench/data.py                 # SQuAD v2 dev, MiniLM tokenizer, 384/128/64, batch 32
    .venv/bin/python bench/data.py --json          # the same, plus a last line of JSON
    .venv/bin/python bench/data.py --mrqa 17000 --json   # an MRQA-shaped file of long contexts, 512/128/64

Figures:
- prepare_s: `spanqa.data.prepare.prepare` into an empty directory (parse + validate + tokenize + write),
  median of --repeats; hf_pair_call_s: for comparison, only the Hugging Face overflowing pair call of
  `run_qa.py` (truncation="only_second", stride, offsets) on the same questions, which writes nothing;
- loader_windows_per_s: one epoch of training batches of 32 (`make_loader`, num_workers=0), full collate
  (padded torch tensors), median over --repeats epochs;
- padding efficiency = real tokens / computed tokens (batch x padded length): bucketed batches of 32
  padded to a multiple of 8 (spanqa), random batches of 32 padded to their longest window, and every
  window padded to max_seq_length (the reference report's setup).

With --mrqa N the data is a synthetic MRQA file (bench/synthetic.py: N questions, each with its own
context of ~800 words of real SQuAD dev paragraphs, gzipped JSON lines, as TriviaQA/SearchQA) prepared at
512/128/64, the setting SpanBERT fine-tunes MRQA with; 17,000 questions make about 50k windows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spanqa.data.formats import load_examples  # noqa: E402
from spanqa.data.loader import make_loader, train_batches  # noqa: E402
from spanqa.data.prepare import prepare  # noqa: E402
from spanqa.data.windows import WindowSettings, quiet_transformers  # noqa: E402
from spanqa.io import load_tokenizer  # noqa: E402
from spanqa.testing import minilm_dir, shared_squad2  # noqa: E402
from synthetic import cached_mrqa_file  # noqa: E402


def time_prepare(data_file: Path, tokenizer, settings: dict, repeats: int) -> tuple[float, object]:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            store = prepare(
                data_file, tokenizer, Path(tmp) / "store", WindowSettings(**settings), progress=False
            )
            times.append(time.perf_counter() - start)
    # keep one store for the loader figures
    keep = Path(tempfile.mkdtemp()) / "store"
    store = prepare(data_file, tokenizer, keep, WindowSettings(**settings), progress=False)
    return statistics.median(times), store


def time_hf_pair_call(data_file: Path, tokenizer, settings: dict) -> float:
    examples = load_examples(data_file).examples
    start = time.perf_counter()
    with quiet_transformers():
        for i in range(0, len(examples), 1000):
            chunk = examples[i : i + 1000]
            tokenizer(
                [ex.question for ex in chunk],
                [ex.context for ex in chunk],
                truncation="only_second",
                max_length=settings["max_seq_length"],
                stride=settings["doc_overlap"],
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
    return time.perf_counter() - start


def time_loader(store, batch_size: int, repeats: int) -> tuple[float, float]:
    """Median windows/s over `repeats` epochs, and the padding efficiency of the batches."""
    rates, real, computed = [], 0, 0
    for epoch in range(repeats):
        loader = make_loader(store, train_batches(store.window_lengths, batch_size, 1, 0, 1, 0, epoch))
        n = 0
        start = time.perf_counter()
        for batch in loader:
            n += len(batch["input_ids"])
            if epoch == 0:
                real += int(batch["attention_mask"].sum())
                computed += batch["input_ids"].numel()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), real / computed


def random_batch_efficiency(lengths: np.ndarray, batch_size: int, seed: int = 0) -> float:
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = [lengths[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    return float(lengths.sum() / sum(len(b) * b.max() for b in batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_file", default=str(shared_squad2("dev-v2.0.json")))
    parser.add_argument("--tokenizer", default=None, help="default: the MiniLM (BERT WordPiece) tokenizer")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    parser.add_argument(
        "--mrqa", type=int, metavar="N", help="a synthetic MRQA file of N long contexts instead"
    )
    args = parser.parse_args()
    settings = {"max_seq_length": 512 if args.mrqa else 384, "doc_overlap": 128, "max_query_length": 64}
    tokenizer = load_tokenizer(args.tokenizer or minilm_dir())
    data_file = cached_mrqa_file(args.mrqa) if args.mrqa else Path(args.data_file)

    prepare_s, store = time_prepare(data_file, tokenizer, settings, args.repeats)
    hf_s = time_hf_pair_call(data_file, tokenizer, settings)
    loader_rate, bucketed = time_loader(store, args.batch_size, args.repeats)
    lengths = np.asarray(store.window_lengths, np.int64)
    result = {
        "data_file": str(data_file),
        "examples": store.meta["counts"]["examples"],
        "windows": len(store),
        "tokens": store.meta["counts"]["tokens"],
        **settings,
        "batch_size": args.batch_size,
        "prepare_s": round(prepare_s, 3),
        "hf_pair_call_s": round(hf_s, 3),
        "loader_windows_per_s": round(loader_rate, 1),
        "padding_efficiency_bucketed": round(bucketed, 4),
        "padding_efficiency_random_batches": round(random_batch_efficiency(lengths, args.batch_size), 4),
        # pad to max_seq_length (the key keeps the name of the default 384)
        "padding_efficiency_pad384": round(
            float(lengths.sum() / (len(lengths) * settings["max_seq_length"])), 4
        ),
    }
    rows = [
        (
            "windows",
            f"{result['windows']:,} from {result['examples']:,} questions "
            f"({result['windows'] / result['examples']:.2f} per question)",
        ),
        ("prepare (parse, validate, tokenize, write)", f"{result['prepare_s']:.2f} s"),
        ("  HF overflowing pair call alone (for comparison)", f"{result['hf_pair_call_s']:.2f} s"),
        (
            f"loader, batch {args.batch_size}, num_workers=0, collate",
            f"{result['loader_windows_per_s']:,.0f} windows/s",
        ),
        ("padding efficiency, bucketed, pad to x8", f"{result['padding_efficiency_bucketed']:.3f}"),
        ("padding efficiency, random batches", f"{result['padding_efficiency_random_batches']:.3f}"),
        (
            f"padding efficiency, pad every window to {settings['max_seq_length']}",
            f"{result['padding_efficiency_pad384']:.3f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    window = "/".join(str(settings[k]) for k in ("max_seq_length", "doc_overlap", "max_query_length"))
    print(f"{data_file.name}, {window}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
