"""spanqa's CRF against pytorch-crf, same parameters and inputs: log-likelihood forward+backward and
Viterbi decode, median wall time, on CPU (and CUDA with the fused Triton kernel when present).

    .venv/bin/python bench/crf.py            # table
    .venv/bin/python bench/crf.py --json     # table, then one line of JSON
    .venv/bin/python bench/crf.py --threads 1   # one CPU thread (steadier on a shared machine)

Each figure is the median over rounds of a call made right after a call of the same function (the
steady state a loop over batches runs in); the rounds alternate the two libraries, so that both see
the same machine load. The call right after the other library's is timed too and printed as
"after the other": pytorch-crf's decode leaves the CPU's caches and the memory allocator cold for the
next call, which costs spanqa's few-millisecond calls a large share (a 1.6 ms decode takes 2.1 ms
there) and pytorch-crf's tens of milliseconds almost nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torchcrf

from spanqa.model.crf import CRF


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    num_tags: int
    min_length: int = 100
    tagging: str | None = None  # a CRF head tag scheme: its hard constraints, and gold tags it allows

    @property
    def name(self) -> str:
        return f"B{self.batch}xT{self.length}xK{self.num_tags}" + (f"-{self.tagging}" if self.tagging else "")


# the last: the CRF head's one-span scheme (4 tags, constrained: the log-space scan), pytorch-crf given
# the same constraints as -inf transitions
CASES = (Case(32, 384, 3), Case(8, 384, 5), Case(32, 384, 4, tagging="span"))
GOAL = 20.0  # the target for both speedups in the main case


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Emissions, gold tags and prefix masks of random lengths in [min_length, length] (under a tag
    scheme: the tags of a random answer of up to 30 tokens, or none, in each row)."""
    gen = torch.Generator().manual_seed(seed)
    emissions = torch.randn(case.batch, case.length, case.num_tags, generator=gen)
    tags = torch.randint(0, case.num_tags, (case.batch, case.length), generator=gen)
    lengths = torch.randint(case.min_length, case.length + 1, (case.batch,), generator=gen)
    lengths[0] = case.length  # pytorch-crf needs one full row for its time-major loop to cover all
    mask = torch.arange(case.length).view(1, -1) < lengths.view(-1, 1)
    if case.tagging is not None:
        tags = scheme_tags(case.tagging, lengths, mask, gen)
    return emissions.to(device), tags.to(device), mask.to(device)


def scheme_tags(tagging: str, lengths: torch.Tensor, mask: torch.Tensor, gen: torch.Generator):
    from spanqa.model.tagging import TAGGINGS

    starts = (torch.rand(len(lengths), generator=gen) * (lengths - 31)).long() + 1
    starts[::4] = 0  # every fourth row: no answer
    ends = starts + torch.randint(0, 30, (len(lengths),), generator=gen)
    tags = TAGGINGS[tagging].tags(starts, ends, mask)
    # padding keeps the last real tag: pytorch-crf scores it as transition x 0, nan when forbidden
    return torch.where(mask, tags, tags.gather(1, (lengths - 1).view(-1, 1)))


def make_crfs(case: Case, device: torch.device) -> tuple[torchcrf.CRF, CRF]:
    """pytorch-crf and spanqa's CRF with the same parameters (and constraints, as -inf in pytorch-crf)."""
    from spanqa.model.tagging import TAGGINGS

    torch.manual_seed(0)
    ref = torchcrf.CRF(case.num_tags, batch_first=True)
    ours = CRF(case.num_tags) if case.tagging is None else TAGGINGS[case.tagging].crf()
    ours.load_state_dict(ref.state_dict())
    if case.tagging is not None:
        with torch.no_grad():
            for name, mask in (
                ("start", ours.start_mask),
                ("end", ours.end_mask),
                ("", ours.transition_mask),
            ):
                if mask is not None:
                    getattr(ref, f"{name}_transitions" if name else "transitions").add_(mask)
    return ref.to(device), ours.to(device)


@dataclass(frozen=True)
class Medians:
    """Median milliseconds of one function: in steady state, and right after the other function."""

    steady: float
    after_other: float


def paired_medians_ms(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[Medians, Medians]:
    """Medians of two functions timed in alternating rounds (the bench machine is shared: a ratio of
    interleaved medians is the robust figure); in a round each runs twice, and the second call is
    the steady-state figure, the first the one after the other function. Which one goes first
    alternates."""

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up (allocator, and Triton compilation)
        fn_a(), fn_b()
    times = {fn_a: ([], []), fn_b: ([], [])}
    gc.collect()
    gc.disable()  # as timeit does: a collection would land in whichever call happens to run then
    try:
        for i in range(repeats):
            for fn in (fn_b, fn_a) if i % 2 else (fn_a, fn_b):
                after_other, steady = times[fn]
                after_other.append(timed(fn))
                steady.append(timed(fn))
    finally:
        gc.enable()
    return tuple(
        Medians(steady=statistics.median(steady) * 1e3, after_other=statistics.median(after_other) * 1e3)
        for after_other, steady in (times[fn_a], times[fn_b])
    )


def fwd_bwd(crf, emissions, tags, mask):
    def run():
        e = emissions.detach().requires_grad_(True)
        crf(e, tags, mask, reduction="mean").neg().backward()

    return run


def count_launches(fn) -> int:
    """CUDA kernels launched by one call of fn, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_case(case: Case, device: torch.device, repeats: int) -> dict:
    ref, ours = make_crfs(case, device)
    emissions, tags, mask = make_inputs(case, device)
    row = {"case": case.name, "device": device.type}
    pairs = {
        "fwd_bwd": (fwd_bwd(ref, emissions, tags, mask), fwd_bwd(ours, emissions, tags, mask)),
        "viterbi": (lambda: ref.decode(emissions, mask), lambda: ours.decode(emissions, mask)),
    }
    for name, (ref_fn, ours_fn) in pairs.items():
        ref_ms, ours_ms = paired_medians_ms(ref_fn, ours_fn, repeats, device)
        row[f"ref_{name}_ms"], row[f"{name}_ms"] = ref_ms.steady, ours_ms.steady
        row[f"{name}_speedup"] = ref_ms.steady / ours_ms.steady
        row[f"ref_{name}_ms_after_other"] = ref_ms.after_other
        row[f"{name}_ms_after_other"] = ours_ms.after_other
        row[f"{name}_speedup_after_other"] = ref_ms.after_other / ours_ms.after_other
    if device.type == "cuda":
        row["ref_launches_fwd_bwd"] = count_launches(fwd_bwd(ref, emissions, tags, mask))
        row["launches_fwd_bwd"] = count_launches(fwd_bwd(ours, emissions, tags, mask))
    return row


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<22} {'dev':<5} {'ref f+b ms':>10} {'ours f+b':>9} {'x':>6} "
        f"{'ref vit ms':>10} {'ours vit':>9} {'x':>6} {'launches ref/ours':>18}"
        "   after the other: f+b x, vit x"
    )
    print(header)
    for r in rows:
        launches = f"{r['ref_launches_fwd_bwd']}/{r['launches_fwd_bwd']}" if "launches_fwd_bwd" in r else "-"
        print(
            f"{r['case']:<22} {r['device']:<5} {r['ref_fwd_bwd_ms']:>10.2f} {r['fwd_bwd_ms']:>9.2f} "
            f"{r['fwd_bwd_speedup']:>6.1f} {r['ref_viterbi_ms']:>10.2f} {r['viterbi_ms']:>9.2f} "
            f"{r['viterbi_speedup']:>6.1f} {launches:>18}   "
            f"{r['fwd_bwd_speedup_after_other']:.1f}, {r['viterbi_speedup_after_other']:.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per figure (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    # both libraries run in this process with these threads; the load says how busy the machine was
    threads, load_before = torch.get_num_threads(), os.getloadavg()
    print(
        f"torch {torch.__version__}, {threads} torch CPU threads (of {os.cpu_count()} CPUs), "
        f"load average {load_before[0]:.2f}, {args.repeats} alternating rounds, median of steady-state calls"
    )
    rows = [bench_case(case, device, args.repeats) for device in devices for case in CASES]
    print_table(rows)
    load_after = os.getloadavg()
    main_row = rows[0]
    goal_met = main_row["fwd_bwd_speedup"] >= GOAL and main_row["viterbi_speedup"] >= GOAL
    print(f"main case {main_row['case']}: goal (both speedups >= {GOAL}) {'met' if goal_met else 'NOT met'}")
    if args.json:
        summary = {
            "fwd_bwd_speedup": main_row["fwd_bwd_speedup"],
            "viterbi_speedup": main_row["viterbi_speedup"],
            "fwd_bwd_speedup_after_other": main_row["fwd_bwd_speedup_after_other"],
            "viterbi_speedup_after_other": main_row["viterbi_speedup_after_other"],
            "goal": GOAL,
            "goal_met": goal_met,
            "num_threads": threads,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before[0],
            "load_average_after": load_after[0],
            "repeats": args.repeats,
            "torch": torch.__version__,
            "rows": rows,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
