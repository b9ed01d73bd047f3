"""Training throughput and model-FLOPs utilisation (MFU) of spanqa on whatever device this is.

Trains a fixed number of steps through spanqa's own Trainer and DeepSpeed engine (the ones
`launcher/train.py` runs), on synthetic windows whose lengths, question/context split and answer
positions are copied from a real window store, with a model built from a config alone (random
weights: nothing to download). After `--warmup` steps it reports samples/s, real tokens/s, the step
time (median, p10, p90), peak memory, the model FLOP/s (spanqa.flops: forward + backward matmuls,
attention included, counted per window on its real tokens) and MFU = that ÷ the device's dense peak
for the dtype (NVIDIA's published figure for A100/H100/H200, else a measured matmul peak).

    python bench/throughput.py --model_config tiny --steps 5 --warmup 2                 # CPU smoke test
    python bench/throughput.py --model_config minilm --head crf --steps 4 --warmup 1
    python bench/throughput.py --model_config spanbert-base --dtype bf16 --batch_size 32 --steps 50
    python bench/throughput.py --model_config spanbert-base --dtype fp16 --world_size 8 --json
    python bench/throughput.py --model path/to/hf_model --store prepared/train --head span

Lengths come from `--store DIR`; by default from the shared SQuAD v2 dev set prepared with the
MiniLM (BERT uncased) tokenizer at --max_seq_length/--doc_stride when it and the tokenizer are
installed, else from DEV_LENGTH_HISTOGRAM below (measured the same way at 384/128).
`--world_size N` re-launches this script through the deepspeed launcher (N ranks, one per GPU, or
N CPU processes); `--batch_size` is per rank, so the global batch is batch_size × world_size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spanqa.data.squad import Example
from spanqa.data.store import WindowStore, build_meta, write_store
from spanqa.data.windows import PairTemplate, WindowArrays, pair_template, tokenizer_fingerprint
from spanqa.errors import SpanqaError
from spanqa.flops import EncoderShape, batch_train_flops, device_peak

REPO_ROOT = Path(__file__).resolve().parent.parent

# Encoder shapes the benchmark can build from a config alone (transformers BertConfig fields).
MODEL_CONFIGS = {
    # SpanBERT/spanbert-base-cased = BERT-base cased: 12 layers, 768 hidden, 12 heads, vocab 28,996.
    "spanbert-base": dict(
        vocab_size=28996,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (spanqa.testing.minilm_dir()): 6 layers, 384 hidden, uncased.
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # spanqa.testing.tiny_bert_dir's shape: for CI.
    "tiny": dict(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
}

# The DeepSpeed config each dtype trains with (the shipped ones launcher/train.py uses).
DS_CONFIGS = {"fp32": "cpu_fp32.json", "bf16": "bf16_zero1.json", "fp16": "fp16_zero1.json"}

# Fallback window lengths where no store is given and the shared dev data is not beside the checkout.
# Measured: SQuAD v2.0 dev (11,873 questions) prepared with the all-MiniLM-L6-v2 tokenizer (BERT
# uncased WordPiece) at max_seq_length 384, doc_stride 128, max_query_length 64 -> 12,134 windows,
# mean 180.0 tokens, median 164; context starts at token 14 (median; p10 10, p90 20).
#   spanqa prepare --data_file ../shared/data/squad2/dev-v2.0.json --tokenizer "$(python -c
#     'from spanqa.testing import minilm_dir; print(minilm_dir())')" --out /tmp/dev-minilm
# Counts of windows with length in [32 + 16·i, 48 + 16·i), then the full windows of exactly 384.
DEV_LENGTH_HISTOGRAM = (
    [
        18,
        49,
        115,
        116,
        456,
        1280,
        2027,
        1664,
        1302,
        1159,
        872,
        706,
        477,
        376,
        353,
        258,
        229,
        105,
        90,
        48,
        100,
        70,
    ],
    264,
)
DEV_CONTEXT_START = 14


@dataclass(frozen=True)
class WindowShapes:
    """Per-window structure copied into the synthetic windows (int arrays of equal length)."""

    lengths: np.ndarray
    context_start: np.ndarray
    context_end: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    source: str  # where the lengths came from, for the report


# ---- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model_config", choices=sorted(MODEL_CONFIGS), help="a shape built with random weights"
    )
    model.add_argument("--model", help="a local Hugging Face model directory (its weights are used)")
    parser.add_argument("--head", choices=("span", "crf"), default="span")
    parser.add_argument(
        "--dtype", choices=sorted(DS_CONFIGS), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="windows per step per rank (CUDA 32, CPU 8)"
    )
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=128)
    parser.add_argument("--max_query_length", type=int, default=64)
    parser.add_argument("--store", help="a window store whose lengths the synthetic windows copy")
    parser.add_argument("--world_size", type=int, default=1, help="ranks, through the deepspeed launcher")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (the Trainer's --compile)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work_dir", help="keep the model, store and run here (default: a temporary directory)"
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.model_config is None and args.model is None:
        args.model_config = "spanbert-base"
    for flag in ("steps", "world_size"):
        if getattr(args, flag) < 1:
            raise SpanqaError(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise SpanqaError(f"--warmup: must not be negative, got {args.warmup}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise SpanqaError(f"--model: {args.model}: not a Hugging Face model directory (no config.json)")
    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.dtype == "fp16" and not cuda:
        raise SpanqaError("--dtype: fp16 training needs a CUDA device (DeepSpeed has no fp16 on CPU)")
    args.batch_size = args.batch_size or (32 if cuda else 8)
    if args.batch_size < 1:
        raise SpanqaError(f"--batch_size: must be at least 1, got {args.batch_size}")
    return args


# ---- launching ranks ------------------------------------------------------------------------------


def launched_by_deepspeed() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch_command(argv: list[str], world_size: int) -> list[str]:
    """This script under the deepspeed launcher: N ranks on this node, on a free port."""
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(world_size),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        *argv,
    ]


def relaunch(argv: list[str], world_size: int) -> int:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # Ranks on CPU share its cores: unset, each would start a thread per core and they would fight.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return subprocess.run(relaunch_command(argv, world_size), env=env, check=False).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A one-process run without a launcher: the rendezvous torch.distributed/DeepSpeed expect."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


# ---- window lengths -------------------------------------------------------------------------------


def shapes_from_store(store: WindowStore, source: str) -> WindowShapes:
    return WindowShapes(
        lengths=np.asarray(store.window_lengths, np.int64),
        context_start=np.asarray(store.context_start, np.int64),
        context_end=np.asarray(store.context_end, np.int64),
        start_positions=np.asarray(store.start_positions, np.int64),
        end_positions=np.asarray(store.end_positions, np.int64),
        source=source,
    )


def shapes_from_histogram(max_seq_length: int, seed: int = 0) -> WindowShapes:
    """DEV_LENGTH_HISTOGRAM as windows (lengths uniform inside a bin, clipped to max_seq_length)."""
    rng = np.random.default_rng(seed)
    counts, full = DEV_LENGTH_HISTOGRAM
    lengths = [rng.integers(32 + 16 * i, 48 + 16 * i, size=n) for i, n in enumerate(counts)]
    lengths = np.minimum(np.concatenate([*lengths, np.full(full, 384)]), max_seq_length)
    context_start = np.minimum(DEV_CONTEXT_START, lengths - 2)
    context_end = lengths - 2  # the last token is [SEP]
    # Half the windows hold an answer (49.1% in the measured store): a one-token span mid-context.
    answer = np.where(rng.random(len(lengths)) < 0.5, (context_start + context_end) // 2, 0)
    source = f"synthetic: SQuAD v2 dev length histogram (bench/throughput.py), clipped to {max_seq_length}"
    return WindowShapes(lengths, context_start, context_end, answer, answer.copy(), source)


def default_store_dir(max_seq_length: int, doc_stride: int, max_query_length: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "spanqa" / "bench" / f"dev-minilm-{max_seq_length}-{doc_stride}-{max_query_length}"


def window_shapes(args: argparse.Namespace) -> WindowShapes:
    """From --store, else the shared dev set prepared (once, cached), else the measured histogram."""
    if args.store is not None:
        store = WindowStore.open(args.store)
        settings = store.meta["settings"]
        if settings["max_seq_length"] > args.max_seq_length:
            raise SpanqaError(
                f"--store: {args.store}: windows up to {settings['max_seq_length']} tokens, longer than "
                f"--max_seq_length {args.max_seq_length}"
            )
        return shapes_from_store(store, f"store {args.store} ({len(store)} windows)")
    try:
        from spanqa.data.prepare import prepare
        from spanqa.testing import minilm_dir, shared_squad2

        dev = shared_squad2("dev-v2.0.json")
        if dev.is_file():
            out = default_store_dir(args.max_seq_length, args.doc_stride, args.max_query_length)
            store = prepare(
                dev,
                str(minilm_dir()),
                out,
                args.max_seq_length,
                args.doc_stride,
                args.max_query_length,
                progress=False,
            )
            return shapes_from_store(store, f"SQuAD v2 dev, MiniLM tokenizer ({len(store)} windows, {out})")
    except SpanqaError:
        pass  # no MiniLM tokenizer installed: fall back to the measured histogram
    return shapes_from_histogram(args.max_seq_length, args.seed)


# ---- a model and a store to train on --------------------------------------------------------------


def write_model_dir(name: str, out_dir: Path, seed: int) -> Path:
    """A Hugging Face BERT directory with random weights of a MODEL_CONFIGS shape, and a tokenizer.

    The tokenizer is a placeholder WordPiece vocabulary of the model's size with BERT's special-token
    ids: the windows are synthetic, so only the sizes matter (and nothing is downloaded).
    """
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig(**MODEL_CONFIGS[name], max_position_embeddings=512, type_vocab_size=2)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    vocab = {piece: i for i, piece in enumerate(placeholder_vocab(config.vocab_size))}
    word_piece = BertWordPieceTokenizer(vocab, lowercase=False)
    BertTokenizerFast(tokenizer_object=word_piece._tokenizer, do_lower_case=False).save_pretrained(str(tmp))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out_dir)
    return out_dir


def placeholder_vocab(size: int) -> list[str]:
    """BERT's layout: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then filler word pieces."""
    vocab = [f"[unused{i}]" for i in range(size)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    for i in range(104, size):
        vocab[i] = f"w{i}"
    return vocab


def synthetic_arrays(
    shapes: WindowShapes,
    n_windows: int,
    vocab_size: int,
    template: PairTemplate,
    special_ids: list[int],
    seed: int,
) -> WindowArrays:
    """`n_windows` windows drawn from `shapes` (with replacement): random ordinary word pieces, and the
    tokenizer's special tokens around question and context as `spanqa prepare` would place them."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(shapes.lengths), size=n_windows)
    lengths = shapes.lengths[pick]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
    input_ids = rng.choice(ordinary, size=int(starts[-1])).astype(np.int64)
    char_offsets = np.full((int(starts[-1]), 2), -1, np.int64)
    context_start, context_end = shapes.context_start[pick], shapes.context_end[pick]
    prefix, middle, suffix = (
        np.asarray(part, np.int64) for part in (template.prefix, template.middle, template.suffix)
    )
    for lo, n, cs, ce in zip(starts, lengths, context_start, context_end, strict=False):
        # Where the copied window leaves less room than this tokenizer's specials take, keep what fits.
        input_ids[lo : lo + min(len(prefix), cs)] = prefix[:cs]
        between = min(len(middle), max(0, cs - len(prefix)))
        input_ids[lo + cs - between : lo + cs] = middle[len(middle) - between :]
        after = min(len(suffix), n - ce - 1)
        input_ids[lo + ce + 1 : lo + ce + 1 + after] = suffix[:after]
        char_offsets[lo + cs : lo + ce + 1, 0] = np.arange(ce - cs + 1) * 5
        char_offsets[lo + cs : lo + ce + 1, 1] = np.arange(ce - cs + 1) * 5 + 4
    return WindowArrays(
        input_ids=input_ids,
        char_offsets=char_offsets,
        window_starts=starts,
        window_lengths=lengths,
        context_start=context_start,
        context_end=context_end,
        start_positions=shapes.start_positions[pick],
        end_positions=shapes.end_positions[pick],
        example_index=np.arange(n_windows),
        doc_offset=np.zeros(n_windows, np.int64),
    )


def write_synthetic_store(
    out_dir: Path, shapes: WindowShapes, n_windows: int, model_dir: Path, settings: dict, seed: int
) -> WindowStore:
    """A window store in spanqa's format (written by spanqa.data.store), one example per window."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = pair_template(tokenizer)
    vocab_size = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    arrays = synthetic_arrays(shapes, n_windows, vocab_size, template, tokenizer.all_special_ids, seed)
    examples = [
        Example(
            id=f"synthetic-{i}", title="synthetic", question="?", context="x", answers=(), is_impossible=True
        )
        for i in range(n_windows)
    ]
    meta = build_meta(
        arrays,
        n_windows,
        tokenizer={
            "name_or_path": str(model_dir),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "second_type_id": template.second_type_id,
            "n_special": template.n_special,
        },
        settings=settings,
        source={"path": f"synthetic ({shapes.source})", "sha256": ""},
        validation={},
    )
    write_store(out_dir, arrays, examples, meta)
    return WindowStore.open(out_dir)


# ---- measuring ------------------------------------------------------------------------------------


class StepTimer:
    """Per-step times without a host sync per step on CUDA (events, read once at the end)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []
        self.cpu_marks: list[float] = []  # this process's CPU time (all threads) at each mark

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    def cpu_share(self, first: int, last: int) -> float | None:
        """CPU: the share of its threads' wall time this process ran between two marks; well below 1
        means other processes held the cores (a shared machine), and the figures are slowed by that."""
        if self.device.type == "cuda":
            return None
        wall = (self.marks[last] - self.marks[first]) * torch.get_num_threads()
        return (self.cpu_marks[last] - self.cpu_marks[first]) / wall

    def intervals(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """CUDA: max allocated since the warm-up ended. CPU: the process's max resident set size, ever."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu max RSS"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(rank_results: list[dict], peak_flops: float) -> dict:
    """Whole-job figures from each rank's measured steps: throughput sums over ranks, MFU over all devices."""
    wall = max(r["wall_seconds"] for r in rank_results)
    windows = sum(r["windows"] for r in rank_results)
    tokens = sum(r["real_tokens"] for r in rank_results)
    flops = sum(r["flops"] for r in rank_results)
    step_seconds = [max(ts) for ts in zip(*(r["step_seconds"] for r in rank_results), strict=True)]
    achieved = flops / wall
    return {
        "samples_per_s": windows / wall,
        "real_tokens_per_s": tokens / wall,
        "step_time_median_s": statistics.median(step_seconds),
        "step_time_p10_s": percentile(step_seconds, 10),
        "step_time_p90_s": percentile(step_seconds, 90),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rank_results),
        "achieved_tflops": achieved / 1e12,
        "achieved_tflops_per_device": achieved / len(rank_results) / 1e12,
        "peak_tflops_per_device": peak_flops / 1e12,
        "mfu": achieved / (peak_flops * len(rank_results)),
        "measured_steps": len(step_seconds),
        "measured_seconds": wall,
        "real_tokens_fraction": tokens / max(1, sum(r["padded_tokens"] for r in rank_results)),
        "cpu_share": None
        if rank_results[0]["cpu_share"] is None
        else min(r["cpu_share"] for r in rank_results),
        "load_average_1min": os.getloadavg()[0],
    }


def flops_text(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:.1f} GFLOP/s"


def print_table(result: dict) -> None:
    achieved = result["achieved_tflops"]
    rows = [
        ("device", f"{result['device']} × {result['world_size']}"),
        ("model", f"{result['model']} ({result['parameters'] / 1e6:.1f}M parameters), head {result['head']}"),
        ("dtype", f"{result['dtype']} (matmuls in {result['matmul_dtype']})"),
        ("batch", f"{result['batch_size']} windows/rank, max_seq_length {result['max_seq_length']}"),
        ("lengths", result["lengths_source"]),
        ("steps", f"{result['measured_steps']} measured after {result['warmup']} warm-up"),
        ("samples/s", f"{result['samples_per_s']:.2f}"),
        (
            "real tokens/s",
            f"{result['real_tokens_per_s']:.0f} ({100 * result['real_tokens_fraction']:.1f}% of padded)",
        ),
        (
            "step time",
            f"median {result['step_time_median_s'] * 1000:.1f} ms "
            f"(p10 {result['step_time_p10_s'] * 1000:.1f}, p90 {result['step_time_p90_s'] * 1000:.1f})",
        ),
        ("peak memory", f"{result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']})"),
        ("model FLOP/s", f"{flops_text(achieved)} ({flops_text(achieved / result['world_size'])}/device)"),
        ("device peak", f"{flops_text(result['peak_tflops_per_device'])} ({result['peak_source']})"),
        ("MFU", f"{100 * result['mfu']:.1f}%"),
    ]
    if result["cpu_share"] is not None:
        load = f"load average {result['load_average_1min']:.1f} on {os.cpu_count()} cores"
        rows.append(("cpu share", f"{100 * result['cpu_share']:.0f}% of its threads' wall time ({load})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


# ---- training through the Trainer -----------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What the ranks train on, built once by the process that launches them."""

    model_dir: str
    model_label: str
    prepared: str  # a directory with the synthetic window store train/ (no dev/: no evaluation)
    lengths_source: str
    output_dir: str


def build_inputs(args: argparse.Namespace, work: Path) -> Inputs:
    """The model directory (random weights for --model_config) and one epoch of synthetic windows:
    (warm-up + measured + 1 closing) steps × batch × world, so the run ends exactly at its last step
    (no mid-epoch stop, whose checkpoint the benchmark would pay for)."""
    shapes = window_shapes(args)
    if args.model_config is not None:
        model_dir = work / f"model-{args.model_config}"
        shutil.rmtree(model_dir, ignore_errors=True)
        write_model_dir(args.model_config, model_dir, args.seed)
        label = f"{args.model_config} (random weights)"
    else:
        model_dir, label = Path(args.model).resolve(), str(args.model)
    settings = {
        "max_seq_length": args.max_seq_length,
        "doc_stride": args.doc_stride,
        "max_query_length": args.max_query_length,
    }
    n_windows = (args.warmup + args.steps + 1) * args.batch_size * args.world_size
    write_synthetic_store(work / "prepared" / "train", shapes, n_windows, model_dir, settings, args.seed)
    inputs = Inputs(str(model_dir), label, str(work / "prepared"), shapes.source, str(work / "run"))
    (work / "inputs.json").write_text(json.dumps(asdict(inputs)))
    return inputs


def train_args(args: argparse.Namespace, inputs: Inputs) -> list[str]:
    """launcher/train.py flags for this benchmark: one epoch over the synthetic store, no evaluation."""
    flags = {
        "--model": inputs.model_dir,
        "--output_dir": inputs.output_dir,
        "--prepared": inputs.prepared,
        "--head": args.head,
        "--train_batch_size": args.batch_size * args.world_size,
        "--num_train_epochs": 1,
        "--warmup_steps": 0,
        "--max_seq_length": args.max_seq_length,
        "--doc_stride": args.doc_stride,
        "--max_query_length": args.max_query_length,
        "--deepspeed_config": REPO_ROOT / "ds_configs" / DS_CONFIGS[args.dtype],
        "--num_workers": args.num_workers,
        "--seed": args.seed,
        "--run_name": f"throughput {inputs.model_label} {args.head} {args.dtype}",
    }
    return [str(x) for pair in flags.items() for x in pair] + (["--compile"] if args.compile else [])


class StepMeter:
    """Wraps Trainer.train_step: marks the start of every step (so a step's time is everything the
    training loop does between two steps: loading, copying, forward, backward, optimizer, logging)
    and counts the windows, real tokens and model FLOPs of each batch from its host-side mask."""

    def __init__(self, device: torch.device, shape: EncoderShape, warmup: int):
        self.device, self.shape, self.warmup = device, shape, warmup
        self.timer = StepTimer(device)
        self.batches: list[tuple[int, int, int, int]] = []  # windows, real tokens, padded tokens, flops

    def wrap(self, train_step):
        def timed_step(batch, *args, **kwargs):
            if len(self.batches) == self.warmup:
                reset_peak_memory(self.device)
            self.timer.mark()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            padded = batch["attention_mask"].numel()
            self.batches.append((len(lengths), sum(lengths), padded, batch_train_flops(self.shape, lengths)))
            return train_step(batch, *args, **kwargs)

        return timed_step

    def result(self, steps: int) -> dict:
        """This rank's figures over the `steps` steps after the warm-up (the closing step only ends
        the last measured one)."""
        seconds = self.timer.intervals()[self.warmup : self.warmup + steps]
        measured = self.batches[self.warmup : self.warmup + steps]
        if len(seconds) < steps:
            raise SpanqaError(f"--steps: the Trainer ran {len(self.batches)} steps, fewer than asked for")
        memory, kind = peak_memory_bytes(self.device)
        return {
            "cpu_share": self.timer.cpu_share(self.warmup, self.warmup + steps),
            "step_seconds": seconds,
            "wall_seconds": sum(seconds),
            "windows": sum(b[0] for b in measured),
            "real_tokens": sum(b[1] for b in measured),
            "padded_tokens": sum(b[2] for b in measured),
            "flops": sum(b[3] for b in measured),
            "peak_memory_bytes": memory,
            "peak_memory_kind": kind,
        }


def train_and_measure(args: argparse.Namespace, inputs: Inputs) -> dict | None:
    """Run the Trainer as launcher/train.py does, measuring each step. The report on rank 0, else None."""
    from spanqa.config import parse_train_args
    from spanqa.train.distributed import destroy_distributed, gather_to_main, init_distributed
    from spanqa.train.engine import Trainer

    config = parse_train_args(train_args(args, inputs))
    env = init_distributed()
    try:
        # Every rank at once (on a CPU they share the cores), before and after training: where the peak
        # is measured, the higher of the two is the less disturbed by other processes.
        peak = device_peak(env.device, args.dtype)
        trainer = Trainer(config, env)
        status = "FAILED"
        try:
            shape = EncoderShape.from_config(trainer.model.encoder.config, args.head)
            meter = StepMeter(env.device, shape, args.warmup)
            trainer.train_step = meter.wrap(trainer.train_step)
            trainer.train()
            mine = meter.result(args.steps)  # first: the second peak measurement allocates memory too
            peak = max(peak, device_peak(env.device, args.dtype), key=lambda p: p.flops_per_s)
            mine["peak_flops"] = peak.flops_per_s
            gathered = gather_to_main(mine, env)
            parameters = sum(p.numel() for p in trainer.model.parameters())
            status = "FINISHED"
        finally:
            trainer.close(status)  # before the work directory (and the MLflow store in it) goes
    finally:
        destroy_distributed()
    if gathered is None:
        return None
    return {
        "device": peak.device,
        "world_size": env.world_size,
        "model": inputs.model_label,
        "parameters": parameters,
        "head": args.head,
        "dtype": args.dtype,
        "matmul_dtype": peak.dtype,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "doc_stride": args.doc_stride,
        "compile": args.compile,
        "lengths_source": inputs.lengths_source,
        "warmup": args.warmup,
        **summarize(gathered, sum(r["peak_flops"] for r in gathered) / len(gathered)),
        "peak_memory_kind": gathered[0]["peak_memory_kind"],
        "peak_source": peak.source
        + (", higher of before/after training" if "measured" in peak.source else ""),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if launched_by_deepspeed() and args.world_size > 1:  # a rank started by relaunch()
        work = Path(args.work_dir)
        result = train_and_measure(args, Inputs(**json.loads((work / "inputs.json").read_text())))
        if result is not None:  # rank 0: the launching process prints it, after the launcher's own lines
            (work / ".result.json.tmp").write_text(json.dumps(result))
            os.replace(work / ".result.json.tmp", work / "result.json")
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="spanqa-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    # The Trainer's MLflow run goes beside the benchmark's files unless the user points it elsewhere:
    # a plain-file store, which starts in a moment where a new SQLite store spends ~15 s on migrations.
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ.update(
            MLFLOW_TRACKING_URI=(work.resolve() / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true"
        )
    try:
        inputs = build_inputs(args, work)
        if args.world_size > 1:
            (work / "result.json").unlink(missing_ok=True)  # a --work_dir may hold an earlier run's
            code = relaunch([*strip_flag(argv, "--work_dir"), "--work_dir", str(work)], args.world_size)
            if code != 0 or not (work / "result.json").is_file():
                raise SpanqaError(f"--world_size: the {args.world_size} ranks failed (exit status {code})")
            report(args, json.loads((work / "result.json").read_text()))
            return 0
        single_process_env()
        report(args, train_and_measure(args, inputs))
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, result: dict) -> None:
    print_table(result)
    if args.json:
        print(json.dumps(result), flush=True)


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpanqaError as err:
        print(f"bench/throughput.py: error: {err}", file=sys.stderr)
        sys.exit(2)
