"""spanqa's CRF against pytorch-crf, same parameters and inputs: log-likelihood forward+backward and
Viterbi decode, median wall time, on CPU and on CUDA (where spanqa runs its fused Triton kernels, and
its torch scan is timed beside them).

    .venv/bin/python bench/crf.py            # table
    .venv/bin/python bench/crf.py --json     # table, then one line of JSON
    .venv/bin/python bench/crf.py --threads 1   # one CPU thread (steadier on a shared machine)
    .venv/bin/python bench/crf.py --device cuda --json   # the GPU rows only (bench/gpu_check.sh)

Each figure is the median over rounds of a call made right after a call of the same function (the
steady state a loop over batches runs in); the rounds rotate the libraries, so that all see the same
machine load. The call right after another library's is timed too and printed as "after the other":
pytorch-crf's decode leaves the CPU's caches and the memory allocator cold for the next call, which
costs spanqa's few-millisecond calls a large share (a 1.6 ms decode takes 2.1 ms there) and
pytorch-crf's tens of milliseconds almost nothing. On CUDA each row also counts the kernels one call
launches (the torch profiler).
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

from spanqa.model.crf import CRF, torch_scan_only


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


# the last two: the CRF head's one-span schemes, `span_end` (the default, 6 tags) and `span` (4),
# constrained (the log-space scan), pytorch-crf given the same constraints as -inf transitions
CASES = (
    Case(32, 384, 3),
    Case(8, 384, 5),
    Case(32, 384, 4, tagging="span"),
    Case(32, 384, 6, tagging="span_end"),
)
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


def interleaved_medians_ms(fns: list, repeats: int, device: torch.device) -> list[Medians]:
    """Medians of functions timed in rotating rounds (the bench machine is shared: a ratio of
    interleaved medians is the robust figure); in a round each runs twice, and the second call is
    the steady-state figure, the first the one after another function. Which one goes first rotates
    (with two functions: alternates)."""

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up (allocator, and Triton compilation)
        for fn in fns:
            fn()
    times = [([], []) for _ in fns]
    gc.collect()
    gc.disable()  # as timeit does: a collection would land in whichever call happens to run then
    try:
        for i in range(repeats):
            for j in [(i + k) % len(fns) for k in range(len(fns))]:
                after_other, steady = times[j]
                after_other.append(timed(fns[j]))
                steady.append(timed(fns[j]))
    finally:
        gc.enable()
    return [
        Medians(steady=statistics.median(steady) * 1e3, after_other=statistics.median(after_other) * 1e3)
        for after_other, steady in times
    ]


def on_torch_scan(fn):
    """fn with spanqa's CRF on its torch scan (on CUDA tensors it would take the Triton kernels)."""

    def run():
        with torch_scan_only():
            return fn()

    return run


def fwd_bwd(crf, emissions, tags, mask):
    def run():
        e = emissions.detach().requires_grad_(True)
        crf(e, tags, mask, reduction="mean").neg().backward()

    return run


def count_launches(fn) -> int:
    """CUDA kernels launched by one call of fn, from the torch profiler (copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for e in kernels if not e.name.lower().startswith(("memcpy", "memset")))


def bench_case(case: Case, device: torch.device, repeats: int) -> dict:
    """One row: pytorch-crf ("ref") and spanqa ("ours": the Triton kernels on CUDA, the torch scan on
    CPU); on CUDA also spanqa's torch scan ("scan") and the kernel launches of each call."""
    ref, ours = make_crfs(case, device)
    emissions, tags, mask = make_inputs(case, device)
    row = {"case": case.name, "device": device.type}
    for name, fns in contenders(ref, ours, emissions, tags, mask, device.type == "cuda").items():
        medians = dict(zip(fns, interleaved_medians_ms(list(fns.values()), repeats, device), strict=True))
        for who, m in medians.items():
            prefix = "" if who == "ours" else f"{who}_"
            row[f"{prefix}{name}_ms"], row[f"{prefix}{name}_ms_after_other"] = m.steady, m.after_other
        row[f"{name}_speedup"] = medians["ref"].steady / medians["ours"].steady
        row[f"{name}_speedup_after_other"] = medians["ref"].after_other / medians["ours"].after_other
        if "scan" in medians:
            row[f"{name}_speedup_vs_scan"] = medians["scan"].steady / medians["ours"].steady
        if device.type == "cuda":
            for who, fn in fns.items():
                row[f"{'' if who == 'ours' else who + '_'}launches_{name}"] = count_launches(fn)
    return row


def contenders(ref, ours, emissions, tags, mask, with_scan: bool) -> dict[str, dict]:
    """{"fwd_bwd" | "viterbi": {"ref" | "ours" | "scan": a call}}."""
    calls = {
        "fwd_bwd": {"ref": fwd_bwd(ref, emissions, tags, mask), "ours": fwd_bwd(ours, emissions, tags, mask)},
        "viterbi": {"ref": lambda: ref.decode(emissions, mask), "ours": lambda: ours.decode(emissions, mask)},
    }
    if with_scan:
        for fns in calls.values():
            fns["scan"] = on_torch_scan(fns["ours"])
    return calls


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<22} {'dev':<5} {'ref f+b ms':>10} {'scan f+b':>9} {'ours f+b':>9} {'x':>6} "
        f"{'ref vit ms':>10} {'scan vit':>9} {'ours vit':>9} {'x':>6} {'f+b launches ref/scan/ours':>28}"
        "   after the other: f+b x, vit x"
    )
    print(header)
    for r in rows:
        scan_fb, scan_vit = (
            f"{r[k]:>9.2f}" if k in r else f"{'-':>9}" for k in ("scan_fwd_bwd_ms", "scan_viterbi_ms")
        )
        launches = "/".join(
            str(r.get(k, "-")) for k in ("ref_launches_fwd_bwd", "scan_launches_fwd_bwd", "launches_fwd_bwd")
        )
        print(
            f"{r['case']:<22} {r['device']:<5} {r['ref_fwd_bwd_ms']:>10.2f} {scan_fb} {r['fwd_bwd_ms']:>9.2f}"
            " "
            f"{r['fwd_bwd_speedup']:>6.1f} {r['ref_viterbi_ms']:>10.2f} {scan_vit} {r['viterbi_ms']:>9.2f} "
            f"{r['viterbi_speedup']:>6.1f} {launches:>28}   "
            f"{r['fwd_bwd_speedup_after_other']:.1f}, {r['viterbi_speedup_after_other']:.1f}"
        )
    print("x: pytorch-crf's time over spanqa's (ours: the Triton kernels on CUDA, the torch scan on CPU)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a last line of JSON")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per figure (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="default: the CPU, and CUDA if present",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    wanted = ("cpu", "cuda") if args.device == "all" else (args.device,)
    devices = [torch.device(d) for d in wanted if d == "cpu" or torch.cuda.is_available()]
    # both libraries run in this process with these threads; the load says how busy the machine was
    threads, load_before = torch.get_num_threads(), os.getloadavg()
    print(
        f"torch {torch.__version__}, {threads} torch CPU threads (of {os.cpu_count()} CPUs), "
        f"load average {load_before[0]:.2f}, {args.repeats} rotating rounds, median of steady-state calls"
    )
    rows = [bench_case(case, device, args.repeats) for device in devices for case in CASES]
    print_table(rows)
    load_after = os.getloadavg()
    main_row = rows[0]
    goal_met = main_row["fwd_bwd_speedup"] >= GOAL and main_row["viterbi_speedup"] >= GOAL
    verdict = "met" if goal_met else "NOT met"
    print(f"main case {main_row['case']} on {main_row['device']}: goal (both speedups >= {GOAL}) {verdict}")
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
