"""spanqa's CRF against pytorch-crf, same parameters and inputs: log-likelihood forward+backward and
Viterbi decode, median wall time, on CPU (and CUDA with the fused Triton kernel when present).

    .venv/bin/python bench/crf.py            # table
    .venv/bin/python bench/crf.py --json     # table, then one line of JSON
    .venv/bin/python bench/crf.py --threads 1   # one CPU thread (steadier on a shared machine)
"""

from __future__ import annotations

import argparse
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

    @property
    def name(self) -> str:
        return f"B{self.batch}xT{self.length}xK{self.num_tags}"


CASES = (Case(32, 384, 3), Case(8, 384, 5))
GOAL = 20.0  # the target for both speedups in the main case


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Emissions, gold tags and prefix masks of random lengths in [min_length, length]."""
    gen = torch.Generator().manual_seed(seed)
    emissions = torch.randn(case.batch, case.length, case.num_tags, generator=gen)
    tags = torch.randint(0, case.num_tags, (case.batch, case.length), generator=gen)
    lengths = torch.randint(case.min_length, case.length + 1, (case.batch,), generator=gen)
    lengths[0] = case.length  # pytorch-crf needs one full row for its time-major loop to cover all
    mask = torch.arange(case.length).view(1, -1) < lengths.view(-1, 1)
    return emissions.to(device), tags.to(device), mask.to(device)


def paired_medians_ms(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall time of each of two functions, calls interleaved so that both see the same
    machine load (the bench machine is shared; a ratio of interleaved medians is the robust figure),
    and which one goes first alternating, so that neither always runs on the other's warm caches."""

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
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2:
            times_b.append(timed(fn_b))
            times_a.append(timed(fn_a))
        else:
            times_a.append(timed(fn_a))
            times_b.append(timed(fn_b))
    return statistics.median(times_a) * 1e3, statistics.median(times_b) * 1e3


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
    torch.manual_seed(0)
    ref = torchcrf.CRF(case.num_tags, batch_first=True).to(device)
    ours = CRF(case.num_tags).to(device)
    ours.load_state_dict(ref.state_dict())
    emissions, tags, mask = make_inputs(case, device)
    row = {"case": case.name, "device": device.type}
    row["ref_fwd_bwd_ms"], row["fwd_bwd_ms"] = paired_medians_ms(
        fwd_bwd(ref, emissions, tags, mask), fwd_bwd(ours, emissions, tags, mask), repeats, device
    )
    row["ref_viterbi_ms"], row["viterbi_ms"] = paired_medians_ms(
        lambda: ref.decode(emissions, mask), lambda: ours.decode(emissions, mask), repeats, device
    )
    row["fwd_bwd_speedup"] = row["ref_fwd_bwd_ms"] / row["fwd_bwd_ms"]
    row["viterbi_speedup"] = row["ref_viterbi_ms"] / row["viterbi_ms"]
    if device.type == "cuda":
        row["ref_launches_fwd_bwd"] = count_launches(fwd_bwd(ref, emissions, tags, mask))
        row["launches_fwd_bwd"] = count_launches(fwd_bwd(ours, emissions, tags, mask))
    return row


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<16} {'dev':<5} {'ref f+b ms':>10} {'ours f+b':>9} {'x':>6} "
        f"{'ref vit ms':>10} {'ours vit':>9} {'x':>6} {'launches ref/ours':>18}"
    )
    print(header)
    for r in rows:
        launches = f"{r['ref_launches_fwd_bwd']}/{r['launches_fwd_bwd']}" if "launches_fwd_bwd" in r else "-"
        print(
            f"{r['case']:<16} {r['device']:<5} {r['ref_fwd_bwd_ms']:>10.2f} {r['fwd_bwd_ms']:>9.2f} "
            f"{r['fwd_bwd_speedup']:>6.1f} {r['ref_viterbi_ms']:>10.2f} {r['viterbi_ms']:>9.2f} "
            f"{r['viterbi_speedup']:>6.1f} {launches:>18}"
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
        f"load average {load_before[0]:.2f}, {args.repeats} interleaved repeats, median"
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
