"""The GPU check's steps, each bounded and timed, with their logs and JSON in one flat folder.

    bash bench/gpu_check.sh OUTDIR              # on a CUDA machine, .wheels/ beside (make gpu-wheels)
    bash bench/gpu_check.sh --dry-run OUTDIR    # the same on CPU, tiny sizes (or SPANQA_GPU_CHECK_CPU=1)

Steps: install .wheels/ with pip (no index, no deps) into a private target folder that goes first on
the children's PYTHONPATH (the image's torch is never touched); the environment (GPU, driver, versions,
a measured bf16 matmul rate); `pytest -m gpu`; bench/crf.py on CUDA; bench/throughput.py for
SpanBERT-base in bf16 and fp16 with both heads on lengths from a real store (the bundled sample,
prepared here); the demo through the deepspeed launcher on one GPU in bf16; and the summary
(bench/gpu_summary.py), which puts every figure and the issue's goals into summary.json.

Every step runs under a timeout: its own cap, and never past the deadline that keeps the whole run
under eight minutes (DEADLINE_S; a dry run's is longer); a step that cannot start in time is reported
as skipped, as are CUDA-only steps on a dry run, each with the reason. OUTDIR gets at most eight files, flat:
pytest.log, crf.log, crf.json, throughput.log, throughput.json, demo.log, demo.json, summary.json.
This file imports nothing outside the standard library, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The carried folder (make gpu-wheels); SPANQA_GPU_CHECK_WHEELS names another, and on a dry run it
# asks for the install too (a rehearsal on CPU with wheels made for this Python: --python-version).
WHEELS = Path(os.environ.get("SPANQA_GPU_CHECK_WHEELS") or REPO / ".wheels")
DEADLINE_S = 465  # the whole check, install included: under 8 minutes with room for the summary
DRY_RUN_DEADLINE_S = 900  # on CPU: two cores that CI or other test runs may share
SUMMARY_RESERVE_S = 25  # kept back from every other step for the summary
OUT_FILES = (
    "pytest.log",
    "crf.log",
    "crf.json",
    "throughput.log",
    "throughput.json",
    "demo.log",
    "demo.json",
)
SAMPLE_TRAIN = REPO / "spanqa" / "sample" / "train.json"

# Per-step caps in seconds on the GPU; the dry run's (2 shared CPU cores) in the second column.
CAPS = {
    "install": (90, 90),
    "environment": (45, 45),
    "pytest": (180, 120),
    "crf": (75, 120),
    "throughput": (170, 300),
    "demo": (150, 300),
    "summary": (25, 25),
}


@dataclass
class Step:
    name: str
    status: str = "not run"  # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    reason: str | None = None
    commands: list[str] = field(default_factory=list)


class Check:
    """The run: where things go, the clock, and each step's record."""

    def __init__(self, out: Path, dry_run: bool, python: str):
        self.out, self.dry_run, self.python = out, dry_run, python
        self.deadline = DRY_RUN_DEADLINE_S if dry_run else DEADLINE_S
        self.started = time.monotonic()
        self.scratch = Path(tempfile.mkdtemp(prefix="spanqa-gpu-check-"))
        self.site = self.scratch / "site"
        self.steps: dict[str, Step] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.update(
            MLFLOW_TRACKING_URI=(self.scratch / "mlruns").as_uri(),
            MLFLOW_ALLOW_FILE_STORE="true",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )

    def left(self, name: str) -> float:
        """Seconds this step may still run: what its cap leaves after its earlier commands, within the
        deadline (less the summary's reserve)."""
        reserve = 0 if name == "summary" else SUMMARY_RESERVE_S
        until_deadline = self.deadline - (time.monotonic() - self.started) - reserve
        spent = self.steps[name].seconds if name in self.steps else 0.0
        return min(CAPS[name][1 if self.dry_run else 0] - spent, until_deadline)

    def step(self, name: str) -> Step:
        return self.steps.setdefault(name, Step(name))

    def skip(self, name: str, reason: str) -> None:
        record = self.step(name)
        record.status, record.reason = "skipped", reason
        print(f"[gpu-check] {name}: skipped ({reason})", flush=True)

    def run(self, name: str, command: list[str], log: Path, env: dict | None = None) -> bool:
        """Run one command of step `name`, output appended to `log`, bounded by what the step has
        left; False (and the step marked) when it fails or runs out of time."""
        record, limit = self.step(name), self.left(name)
        if limit < 5:
            if record.status == "not run":
                self.skip(name, "out of time: the check's deadline is near")
            return False
        record.commands.append(" ".join(command))
        print(f"[gpu-check] {name}: {' '.join(command)} (limit {limit:.0f} s)", flush=True)
        started = time.monotonic()
        with open(log, "a") as sink:
            sink.write(f"$ {' '.join(command)}\n")
            sink.flush()
            code = run_bounded(command, sink, env or self.env, limit)
        record.seconds += time.monotonic() - started
        if code == 0:
            record.status = "passed" if record.status in ("not run", "passed") else record.status
            return True
        record.status = "timed out" if code is None else "failed"
        record.reason = f"timed out after {limit:.0f} s" if code is None else f"exit status {code}"
        print(f"[gpu-check] {name}: {record.status} ({record.reason}); see {log.name}", flush=True)
        return False


def run_bounded(command: list[str], sink, env: dict, limit: float) -> int | None:
    """The exit status, or None when it ran past `limit` (then its whole process group is killed:
    the deepspeed launcher and pytest start processes of their own)."""
    process = subprocess.Popen(
        command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )
    try:
        return process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


# ---------------------------------------------------------------------------------------- the steps


def install(check: Check) -> None:
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if (WHEELS / "minilm").is_dir():  # the demo's encoder, cut to travel (bench/gpu_minilm.py)
        check.env["SPANQA_MINILM_DIR"] = str(WHEELS / "minilm")
    if check.dry_run and "SPANQA_GPU_CHECK_WHEELS" not in os.environ:
        return check.skip("install", "dry run: this environment's own packages are used")
    if not wheels:
        return check.skip(
            "install", f"no wheels in {WHEELS} (run `make gpu-wheels` where pip reaches the index)"
        )
    log = check.scratch / "install.log"
    pip = [check.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    if check.run("install", [*pip, "--no-cache-dir", "--target", str(check.site), *wheels], log):
        check.env["PYTHONPATH"] = os.pathsep.join([str(check.site), check.env["PYTHONPATH"]])
    elif log.is_file():
        check.step("install").reason += ": " + " | ".join(log.read_text().strip().splitlines()[-5:])


def environment(check: Check) -> None:
    command = [
        check.python,
        str(REPO / "bench" / "gpu_summary.py"),
        "environment",
        str(check.scratch / "env.json"),
    ]
    check.run("environment", command, check.scratch / "environment.log")


def pytest_gpu(check: Check) -> None:
    command = [check.python, "-m", "pytest", "-m", "gpu", "-rA", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(check.scratch / "pytest.xml"), "tests"]
    check.run("pytest", command, check.out / "pytest.log")


def crf(check: Check) -> None:
    sizes = ["--device", "cpu", "--repeats", "1", "--threads", "1"] if check.dry_run else ["--device", "cuda"]
    command = [check.python, str(REPO / "bench" / "crf.py"), "--json", *sizes]
    if check.run("crf", command, check.out / "crf.log"):
        write_json(check.out / "crf.json", last_json(check.out / "crf.log"))


def throughput(check: Check) -> None:
    log, stores = check.out / "throughput.log", prepare_stores(check)
    if stores is None:
        return
    runs, skipped = [], []
    for dtype in ("bf16", "fp16"):
        for head in ("span", "crf"):
            if check.dry_run and dtype == "fp16":
                skipped.append(
                    {"dtype": dtype, "head": head, "reason": "fp16 needs CUDA (DeepSpeed has none on CPU)"}
                )
                continue
            work = check.scratch / f"throughput-{dtype}-{head}"
            command = [check.python, str(REPO / "bench" / "throughput.py"), "--json", "--work_dir", str(work)]
            command += throughput_sizes(check.dry_run) + ["--dtype", dtype, "--head", head]
            command += ["--store", str(stores["384"]), "--max_seq_length", "384", "--doc_overlap", "128"]
            if check.run("throughput", command, log):
                runs.append(last_json(log))
    stats = {length: store_counts(path) for length, path in stores.items()}
    write_json(check.out / "throughput.json", {"runs": runs, "skipped": skipped, "stores": stats})


def throughput_sizes(dry_run: bool) -> list[str]:
    if dry_run:
        return ["--model_config", "tiny", "--batch_size", "4", "--steps", "2", "--warmup", "1"]
    return ["--model_config", "spanbert-base", "--batch_size", "32", "--steps", "50", "--warmup", "5"]


def prepare_stores(check: Check) -> dict[str, Path] | None:
    """Window stores of the bundled SQuAD v2 sample with the MiniLM tokenizer at 384/128 (whose lengths
    the throughput runs copy) and 512/128 (for the SpanBERT recipe's projection)."""
    tokenizer = check.env.get("SPANQA_MINILM_DIR") or minilm_package_dir(check)
    stores = {}
    for length in ("384", "512"):
        out = check.scratch / "stores" / f"sample-{length}"
        command = [check.python, "-m", "spanqa.cli", "prepare", "--data_file", str(SAMPLE_TRAIN)]
        command += ["--tokenizer", tokenizer, "--out", str(out), "--max_seq_length", length]
        command += ["--doc_overlap", "128", "--no_progress"]
        if not check.run("throughput", command, check.out / "throughput.log"):
            return None
        stores[length] = out
    return stores


def minilm_package_dir(check: Check) -> str:
    code = "from spanqa.demo import minilm_dir; print(minilm_dir())"
    done = subprocess.run([check.python, "-c", code], capture_output=True, text=True, env=check.env)
    return done.stdout.strip() or "the MiniLM package is missing"


def demo(check: Check) -> None:
    """`spanqa demo`'s own launcher command (its flags, the MiniLM, the bundled sample), on one GPU
    and a free port, in bf16."""
    out, log = check.scratch / "demo", check.out / "demo.log"
    extra = ["--deepspeed_config", str(REPO / "spanqa" / "ds_configs" / "bf16_zero1.json")]
    if check.dry_run:  # the tiny model, a few steps, one evaluation
        extra += ["--model", str(tiny_model(check)), "--max_steps", "3", "--eval_steps", "3"]
    command = demo_command(check, out, extra)
    if command is None:
        return
    started = time.monotonic()
    if check.run("demo", command, log):
        wall = time.monotonic() - started
        figures = [
            check.python,
            str(REPO / "bench" / "gpu_summary.py"),
            "demo",
            str(out),
            str(check.out / "demo.json"),
        ]
        check.run("demo", [*figures, "--wall_seconds", f"{wall:.1f}"], log)


def demo_command(check: Check, out: Path, extra: list[str]) -> list[str] | None:
    code = (
        "import json, sys; from pathlib import Path; from spanqa import demo; "
        "print(json.dumps(demo.launcher_command(demo.training_flags(Path(sys.argv[1]), sys.argv[2:]))))"
    )
    done = subprocess.run(
        [check.python, "-c", code, str(out), *extra], capture_output=True, text=True, env=check.env, cwd=REPO
    )
    command = json.loads(done.stdout) if done.returncode == 0 else []
    if "--num_gpus" not in command:
        reason = done.stderr.strip().splitlines()[-1:] or ["spanqa.demo.launcher_command has no --num_gpus"]
        check.step("demo").status, check.step("demo").reason = "failed", reason[0]
        return None
    at = command.index("--num_gpus")
    return [*command[:at], "--num_gpus", "1", "--master_port", str(free_port()), *command[at + 2 :]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(check: Check) -> Path:
    path = check.scratch / "tiny-bert"
    code = f"from spanqa.testing import tiny_bert_dir; tiny_bert_dir({str(path)!r})"
    subprocess.run([check.python, "-c", code], env=check.env, check=False, capture_output=True)
    return path


def summary(check: Check) -> None:
    steps_file = write_json(check.scratch / "steps.json", steps_report(check))
    command = [check.python, str(REPO / "bench" / "gpu_summary.py"), "summary", str(check.out)]
    command += ["--steps", str(steps_file), "--scratch", str(check.scratch)]
    if not check.run("summary", command, check.scratch / "summary.log"):
        # the summary's own failure is reported in the file it could not write
        report = steps_report(check)
        report["summary_log"] = (check.scratch / "summary.log").read_text()[-4000:]
        write_json(check.out / "summary.json", report)


# ------------------------------------------------------------------------------------------ helpers


def steps_report(check: Check) -> dict:
    return {
        "dry_run": check.dry_run,
        "seconds": round(time.monotonic() - check.started, 1),
        "deadline_seconds": check.deadline,
        "steps": {name: asdict(step) for name, step in check.steps.items()},
    }


def last_json(log: Path) -> dict:
    """The last line of `log` that is a JSON object (what a benchmark's --json prints last; warnings
    at shutdown may follow it)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"{log}: no line of JSON")


def store_counts(path: Path) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    return {
        "path": str(path),
        "settings": meta["settings"],
        **meta["counts"],
        "source": meta["source"]["path"],
    }


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


# The steps between the install and the summary, in order (the environment always runs).
STEPS = {"environment": environment, "pytest": pytest_gpu, "crf": crf, "throughput": throughput, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder for the logs and JSON (at most eight files)")
    parser.add_argument(
        "--dry-run", action="store_true", help="on CPU with tiny sizes (SPANQA_GPU_CHECK_CPU=1)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models, stores, runs)")
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=list(STEPS),
        help=f"run only these steps (a rerun of failed ones), comma-separated from: {','.join(STEPS)}",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        parser.error(f"--only: no step {', '.join(unknown)} (the steps: {', '.join(STEPS)})")
    dry_run = args.dry_run or os.environ.get("SPANQA_GPU_CHECK_CPU") == "1"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (*OUT_FILES, "summary.json"):
        (args.out / name).unlink(missing_ok=True)  # a folder reused for a second run holds this run only
    check = Check(args.out, dry_run, sys.executable)
    try:
        install(check)
        for name, step in STEPS.items():
            if check.step("install").status in ("failed", "timed out"):
                check.skip(name, "not run: the install of .wheels/ failed")
            elif name not in args.only and name != "environment":
                check.skip(name, "not asked for (--only)")
            else:
                step(check)
        summary(check)
    finally:
        if not args.keep:
            shutil.rmtree(check.scratch, ignore_errors=True)
    failed = [s.name for s in check.steps.values() if s.status in ("failed", "timed out")]
    print(f"[gpu-check] {time.monotonic() - check.started:.0f} s; summary: {args.out / 'summary.json'}")
    print(f"[gpu-check] {'FAILED: ' + ', '.join(failed) if failed else 'every step that ran passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
