"""slurm/train.sbatch and slurm/compare.sbatch against a real SLURM cluster (tests/slurm_cluster.py).

One cluster (slurmctld + two slurmd on 127.0.0.1) serves the whole module. Jobs train a tiny BERT
(2 layers, hidden 64) on the 51-question fixture on CPU with gloo over loopback. Every wait is bounded;
a job that overruns is cancelled and the test fails with its log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import (
    FINAL_STATES,
    ClusterError,
    SlurmCluster,
    start_cluster,
    stop_cluster,
    unavailable_reason,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "slurm" / "train.sbatch")
COMPARE = str(REPO / "slurm" / "compare.sbatch")
FIXTURE = REPO / "tests" / "fixtures" / "squad_v2_tiny.json"
JOB_TIMEOUT = 300  # seconds; a tiny job takes well under a minute when the machine is not overloaded
# Epochs of the run that gets preempted and of its uninterrupted twin: long enough (in optimizer steps)
# that the signal, sent once a few steps are logged, lands before the end.
LONG_EPOCHS = "4"


@dataclass
class Workspace:
    """Everything the jobs of this module share: a directory, their environment and their flags."""

    root: Path
    cluster: SlurmCluster
    env: dict[str, str]
    flags: list[str]

    def sbatch_options(self, name: str) -> list[str]:
        log = self.root / "logs" / f"{name}-%j.out"
        # A time limit as a safety net (far above the jobs' run time, so the USR1 warning never fires).
        return [f"--chdir={self.root}", f"--output={log}", "--time=15", f"--job-name={name}"]

    def log_of(self, name: str, job_id: str) -> str:
        path = self.root / "logs" / f"{name}-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def runs_tagged(self, tag: str) -> list:
        client = self.mlflow()
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, filter_string=f"tags.`spanqa.tag` = '{tag}'")


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="spanqa-slurm-"))
    try:
        started = start_cluster(root, n_nodes=2)
    except ClusterError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the SLURM cluster could not start: {err}")
    yield started
    stop_cluster(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(cluster):
    from spanqa.testing import tiny_bert_dir

    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing")
    root = Path(tempfile.mkdtemp(prefix="spanqa-slurm-jobs-"))
    (root / "logs").mkdir()
    model = tiny_bert_dir(root / "tiny-bert")
    env = {
        **cluster.env,
        "SPANQA_ROOT": str(REPO),
        "SPANQA_PYTHON": sys.executable,
        "SPANQA_RUNS_DIR": str(root / "runs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    flags = [
        "--model", str(model), "--train_file", str(FIXTURE), "--dev_file", str(FIXTURE),
        "--max_seq_length", "128", "--doc_overlap", "32", "--max_query_length", "32",
        "--train_batch_size", "8", "--eval_batch_size", "64", "--learning_rate", "1e-4",
        "--warmup_steps", "0", "--logging_steps", "1", "--seed", "0",
    ]  # fmt: skip
    yield Workspace(root, cluster, env, flags)
    shutil.rmtree(root, ignore_errors=True)


def train_log(output_dir: Path) -> list[dict]:
    path = output_dir / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_steps(output_dir: Path) -> list[int]:
    return [entry["step"] for entry in train_log(output_dir) if entry.get("kind") == "train"]


def job_field(cluster: SlurmCluster, job_id: str, key: str) -> str:
    records = cluster.job_records(job_id)
    return records[0].get(key, "") if records else ""


def the_run(ws: Workspace, tag: str, output_dir: Path):
    """The one MLflow run tagged `tag`, which must be the one whose id the output dir keeps."""
    runs = ws.runs_tagged(tag)
    assert len(runs) == 1, f"expected one MLflow run tagged {tag}, found {[r.info.run_id for r in runs]}"
    run = runs[0]
    assert (output_dir / "mlflow_run_id").read_text().strip() == run.info.run_id
    return run


@pytest.fixture(scope="module")
def one_node_run(workspace):
    """`sbatch --wait` of 2 tasks on one node, uninterrupted: (job id, exit code, output dir)."""
    out = workspace.root / "runs" / "one-node"
    job_id, rc = workspace.cluster.sbatch_wait(
        *workspace.sbatch_options("one-node"), "--nodes=1", "--ntasks=2", TRAIN,
        *workspace.flags, "--num_train_epochs", LONG_EPOCHS, "--tag", "one-node", "--output_dir", str(out),
        env=workspace.env, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    return job_id, rc, out


def test_two_tasks_on_one_node(workspace, one_node_run):
    job_id, rc, out = one_node_run
    log = workspace.log_of("one-node", job_id)
    assert rc == 0, log
    assert "2 tasks" in log and "master 127.0.0.1:" in log, log
    run = the_run(workspace, "one-node", out)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    best = out / "best_model"
    assert (best / "spanqa_config.json").is_file(), sorted(p.name for p in out.iterdir())
    assert (best / "model.safetensors").is_file(), sorted(p.name for p in best.iterdir())
    assert json.loads((best / "spanqa_config.json").read_text())["head"] == "span"


def test_two_nodes_one_task_each(workspace):
    out = workspace.root / "runs" / "two-nodes"
    job_id, rc = workspace.cluster.sbatch_wait(
        *workspace.sbatch_options("two-nodes"), "--nodes=2", "--ntasks-per-node=1", TRAIN,
        *workspace.flags, "--num_train_epochs", "1", "--tag", "two-nodes", "--output_dir", str(out),
        env=workspace.env, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    log = workspace.log_of("two-nodes", job_id)
    assert rc == 0, log
    assert "on n[1-2]: 2 tasks" in log, log
    run = the_run(workspace, "two-nodes", out)
    assert run.data.params["world_size"] == "2"
    assert run.info.status == "FINISHED"


@dataclass
class FinishedJob:
    job_id: str
    records: list[dict[str, str]]
    out: Path
    log: str


@pytest.fixture(scope="module")
def preempted_run(workspace) -> FinishedJob:
    """The one-node job, preempted with `scancel --signal=USR1 --batch` after 3 optimizer steps."""
    cluster = workspace.cluster
    job_id, out = long_run_after_steps(workspace, "preempted", ["--nodes=1", "--ntasks=2"], steps=3)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    records = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    return FinishedJob(job_id, records, out, workspace.log_of("preempted", job_id))


def test_preemption_requeues_and_resumes_in_the_same_run(workspace, one_node_run, preempted_run):
    job, log = preempted_run, preempted_run.log
    assert job.records[0]["JobState"] == "COMPLETED", log
    assert job.records[0]["Restarts"] == "1", log
    assert "batch shell got SIGUSR1, forwarding it to the tasks" in log, log
    assert "preemption signal: saving a checkpoint" in log, log
    assert f"scontrol requeue {job.job_id}: done" in log, log
    assert "restart 1 on n1" in log, log  # the requeued job saw SLURM_RESTART_COUNT=1
    assert "resumed from" in log, log

    _, baseline_rc, baseline_out = one_node_run
    assert baseline_rc == 0
    steps, baseline = train_steps(job.out), train_steps(baseline_out)
    # Resumed, not restarted: every optimizer step ran exactly once, as many as without preemption.
    assert steps == list(range(1, len(steps) + 1)), steps
    assert steps == baseline
    run = the_run(workspace, "preempted", job.out)
    assert run.info.status == "FINISHED"
    assert (job.out / "best_model" / "model.safetensors").is_file()


def test_preempted_attempt_exits_cleanly_and_keeps_its_metrics(workspace, one_node_run, preempted_run):
    job = preempted_run
    assert "restart 0: training exited 0" in job.log, job.log
    run = the_run(workspace, "preempted", job.out)
    loss_steps = [m.step for m in workspace.mlflow().get_metric_history(run.info.run_id, "loss")]
    assert sorted(loss_steps) == train_steps(one_node_run[2])


def test_scancel_cancels_for_good_and_keeps_a_checkpoint(workspace):
    cluster = workspace.cluster
    job_id, out = long_run_after_steps(workspace, "cancelled", ["--ntasks=1"], steps=2)
    cluster.run("scancel", job_id)  # what a user types
    ended_or_back = lambda rec: rec["JobState"] in FINAL_STATES or rec["Restarts"] != "0"  # noqa: E731
    record = wait_until(cluster, job_id, ended_or_back)
    if record["JobState"] not in FINAL_STATES:
        cluster.cancel(job_id)  # it came back: cancel it for good before failing
        cluster.wait_job(job_id, timeout=60)
    log = workspace.log_of("cancelled", job_id)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), log
    # SIGTERM also saves: a complete checkpoint of the step it stopped at, and the run is closed.
    assert list((out / "checkpoints").glob("step-*/complete")), log
    assert "scontrol requeue" not in log, log
    assert the_run(workspace, "cancelled", out).info.status == "KILLED", log


def long_run_after_steps(workspace: Workspace, name: str, tasks: list[str], steps: int) -> tuple[str, Path]:
    """Submit a LONG_EPOCHS training job tagged `name` and return (job id, output dir) once it has
    logged `steps` optimizer steps (cancelled, and the test failed, if it never does)."""
    out = workspace.root / "runs" / name
    job_id = workspace.cluster.sbatch(
        *workspace.sbatch_options(name), *tasks, TRAIN,
        *workspace.flags, "--num_train_epochs", LONG_EPOCHS, "--tag", name, "--output_dir", str(out),
        env=workspace.env,
    )  # fmt: skip
    wait_for_steps(workspace.cluster, job_id, out, steps=steps, timeout=JOB_TIMEOUT)
    return job_id, out


def wait_until(cluster: SlurmCluster, job_id: str, predicate, timeout: float = 120) -> dict[str, str]:
    """The job's record once `predicate(record)` holds; cancel the job and fail if it never does."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = cluster.job_records(job_id)
        if records and predicate(records[0]):
            return records[0]
        time.sleep(0.5)
    cluster.cancel_stuck(job_id, records, timeout, wanted={"the expected state"})
    raise AssertionError("unreachable")


def wait_for_steps(cluster: SlurmCluster, job_id: str, out: Path, steps: int, timeout: float) -> None:
    """Wait until the job has logged `steps` optimizer steps; cancel it if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(train_steps(out)) >= steps:
            return
        state = job_field(cluster, job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {job_id} ended ({state}) before it logged {steps} steps")
        time.sleep(0.1)
    cluster.cancel_stuck(job_id, cluster.job_records(job_id), timeout, wanted={f"{steps} steps logged"})


def test_compare_array_trains_both_heads_and_prints_the_table(workspace):
    cluster = workspace.cluster
    base = workspace.root / "runs" / "compare"
    array_id = cluster.sbatch(
        f"--chdir={workspace.root}", f"--output={workspace.root}/logs/compare-%A_%a.out", "--time=15",
        COMPARE, *workspace.flags, "--num_train_epochs", "1", "--tag", "heads", "--output_dir", str(base),
        env=workspace.env,
    )  # fmt: skip
    records = cluster.wait_job(array_id, timeout=JOB_TIMEOUT, tasks=2)
    logs = "\n".join(workspace.log_of("compare", f"{array_id}_{i}") for i in (0, 1))
    assert sorted(rec["JobState"] for rec in records) == ["COMPLETED", "COMPLETED"], logs

    runs = workspace.runs_tagged("heads")
    heads = sorted(run.data.params["config.head"] for run in runs)
    assert heads == ["crf", "span"], [r.info.run_id for r in runs]
    assert len({run.data.params["config.seed"] for run in runs}) == 1
    for head in ("span", "crf"):
        assert (base / head / "mlflow_run_id").is_file(), logs

    table_job = (base / "compare_job_id").read_text().strip()
    cluster.wait_job(table_job, timeout=60)
    table = (base / "compare.txt").read_text()
    assert "runs tagged spanqa.tag = 'heads'" in table, table
    head_row = next(line for line in table.splitlines() if line.startswith("head "))
    assert head_row.split()[1:] == ["crf", "span"], table
    assert any(line.startswith("EM ") for line in table.splitlines()), table

    direct = subprocess.run(
        [sys.executable, "-m", "spanqa.cli", "compare", "heads"],
        env=workspace.env, capture_output=True, text=True, timeout=120, cwd=workspace.root,
    )  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == table


def test_compare_array_with_several_seeds_per_head(workspace):
    """--seeds 2 on an array of 4 tasks: span and crf with seeds 0 and 1, then the comparison of the
    heads' seed means, with mean ± std per head."""
    cluster = workspace.cluster
    base = workspace.root / "runs" / "seeds"
    array_id = cluster.sbatch(
        f"--chdir={workspace.root}", f"--output={workspace.root}/logs/seeds-%A_%a.out", "--time=15",
        "--array=0-3", COMPARE, *workspace.flags, "--num_train_epochs", "1", "--seeds", "2", "--tag", "seeds",
        "--output_dir", str(base), env=workspace.env,
    )  # fmt: skip
    records = cluster.wait_job(array_id, timeout=2 * JOB_TIMEOUT, tasks=4)
    logs = "\n".join(workspace.log_of("seeds", f"{array_id}_{i}") for i in range(4))
    assert [rec["JobState"] for rec in records] == ["COMPLETED"] * 4, logs
    runs = workspace.runs_tagged("seeds")
    assert sorted((r.data.params["config.head"], r.data.params["config.seed"]) for r in runs) == [
        ("crf", "0"), ("crf", "1"), ("span", "0"), ("span", "1"),
    ]  # fmt: skip
    assert sorted(p.name for p in base.iterdir() if p.name.endswith(("seed0", "seed1"))) == [
        "crf-seed0", "crf-seed1", "span-seed0", "span-seed1",
    ]  # fmt: skip
    cluster.wait_job((base / "compare_job_id").read_text().strip(), timeout=120)
    table = (base / "compare.txt").read_text()
    assert "span: 2 runs (seeds 0, 1): EM " in table and "crf: 2 runs (seeds 0, 1): EM " in table, table
    assert "crf - span" in table and "breakdowns (EM / F1, %):" in table, table
    result = json.loads((base / "compare" / "compare.json").read_text())["comparison"]
    assert result["entries"]["span"]["runs"] == 2 and len(result["breakdowns"]) == 4


def test_compare_seeds_need_an_array_of_twice_as_many_tasks(workspace):
    array_id = workspace.cluster.sbatch(
        f"--chdir={workspace.root}", f"--output={workspace.root}/logs/bad-seeds-%A_%a.out", "--time=5",
        COMPARE, *workspace.flags, "--seeds", "3", "--tag", "bad-seeds", env=workspace.env,
    )  # fmt: skip
    records = workspace.cluster.wait_job(array_id, timeout=60, tasks=2)
    assert [rec["JobState"] for rec in records] == ["FAILED", "FAILED"]
    log = workspace.log_of("bad-seeds", f"{array_id}_0")
    assert "--seeds 3 needs an array of 6 tasks (span and crf per seed), this one has 2" in log, log
    assert "sbatch --array=0-5 slurm/compare.sbatch --seeds 3" in log
    assert not workspace.runs_tagged("bad-seeds")


def test_a_stuck_job_is_cancelled_and_reported(cluster):
    job_id = cluster.sbatch("--wrap", "sleep 600", "--output=/dev/null")
    with pytest.raises(ClusterError, match=f"job {job_id} did not finish within 2 s and was cancelled"):
        cluster.wait_job(job_id, timeout=2)
    assert cluster.wait_job(job_id, timeout=30)[0]["JobState"] == "CANCELLED"


def test_a_failing_trainer_fails_the_job(workspace):
    job_id, rc = workspace.cluster.sbatch_wait(
        *workspace.sbatch_options("bad-flag"), TRAIN, *workspace.flags, "--head", "no-such-head",
        env=workspace.env, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    log = workspace.log_of("bad-flag", job_id)
    assert rc != 0, log
    assert "--head" in log and "training exited" in log, log
