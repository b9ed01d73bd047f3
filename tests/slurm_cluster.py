"""A real SLURM cluster on this machine, from Debian's packages, for the SLURM tests and for people.

One slurmctld and one or more slurmd (one `NodeName` per port, `slurmd -N NAME`), all on 127.0.0.1,
authenticated by a munged of their own (its own key and socket), everything under one directory:

    python tests/slurm_cluster.py start [--dir DIR] [--nodes 2]   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop [--dir DIR]

Daemons run in the foreground of their own sessions and are stopped by the pids this module wrote,
so nothing here touches a system-wide SLURM or munge. Every wait has a timeout. Needs root (slurmd
starts jobs as their user) and the packages slurmctld, slurmd, slurm-client, munge
(`tests/setup_slurm.sh` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = Path(tempfile.gettempdir()) / "spanqa-slurm"
SBIN_DIRS = "/usr/sbin:/sbin:/usr/local/sbin"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue")
# A job in one of these states will not run again by itself (a requeued job passes through
# REQUEUED/PENDING, which are not here).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class ClusterError(RuntimeError):
    """The cluster could not start, or a job did not end as it should; the message says where to look."""


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here, or None when it can."""
    if sys.platform != "linux":
        return f"SLURM tests need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "SLURM tests need root (slurmd starts jobs as their user); run them as root"
    missing = [name for name in BINARIES if find_binary(name) is None]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)}): run tests/setup_slurm.sh as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user does not exist (install the munge package)"
    return None


def find_binary(name: str) -> str | None:
    """The program's path; daemons live in sbin, which a non-login shell's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=SBIN_DIRS)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class ClusterLayout:
    """Where one cluster keeps its config, state, logs and pid files."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def pid_file(self, daemon: str) -> Path:
        return self.root / "pids" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"


def slurm_conf_text(layout: ClusterLayout, nodes: list[str], ports: list[int], cpus: int) -> str:
    """slurm.conf for a cluster whose nodes are all slurmd processes on 127.0.0.1."""
    ctld_port, *node_ports = ports
    root = layout.root
    lines = [
        "ClusterName=spanqa",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={node_ports[0]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A short credential lifetime: a requeued job may start again only after its old
        # credential expired, so the default (120 s) would make every requeue wait two minutes.
        f"AuthInfo=socket={layout.munge_socket},cred_expire=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.%n.pid",
        f"SlurmctldLogFile={layout.log_file('slurmctld')}",
        f"SlurmdLogFile={layout.log_dir}/slurmd.%n.log",
        # No cgroups and no systemd in containers: track processes by their parent pid.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        # Look at the queue every few seconds so that a requeued job runs again promptly.
        "SchedulerParameters=sched_interval=5,bf_interval=5",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # Nodes may declare more CPUs than this machine has (several slurmd share its cores).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # How long a finished job stays visible to `scontrol show job` (there is no accounting). It
        # also sets `sbatch --wait`'s polling: its sleep grows ×4 from 2 s while below MinJobAge/2,
        # so 16 keeps it at 8 s (the default, 300, lets it reach 32 s).
        "MinJobAge=16",
        "KillWait=15",
        "InactiveLimit=0",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"PlugStackConfig={root}/etc/plugstack.conf",
    ]
    for name, port in zip(nodes, node_ports, strict=True):
        lines.append(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def cgroup_conf_text() -> str:
    """cgroup.conf: unused by proctrack/linuxproc and task/none, but slurmd reads it when present."""
    lines = [
        "# proctrack/linuxproc and task/none: no cgroups are used.",
        "CgroupPlugin=autodetect",
        "IgnoreSystemd=yes",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    """A started cluster: its layout, node names and the environment clients need (SLURM_CONF)."""

    layout: ClusterLayout
    nodes: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = {}
        for line in proc.stdout.splitlines():
            name, _, state = line.partition(" ")
            states[name] = state.strip()
        return states

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (registered, no job), or raise with the logs' tails."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(name) == "idle" for name in self.nodes):
                return
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.log_tails()}")

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as dicts (one per array task); [] once the job is forgotten."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return [parse_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait_job(self, job_id: str, timeout: float, tasks: int = 1) -> list[dict[str, str]]:
        """Wait until the job (all `tasks` tasks of an array) is in a final state; returns the last
        record seen of each task. A job that overruns `timeout` is cancelled and reported."""
        deadline = time.monotonic() + timeout
        # Keyed by array task (or job id): a task that ended is forgotten by slurmctld after
        # MinJobAge while the others still run, so remember what each one last looked like.
        seen: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            current = self.job_records(job_id)
            for rec in current:
                seen[rec.get("ArrayTaskId") or rec.get("JobId", "")] = rec
            finished = [rec for rec in seen.values() if rec.get("JobState") in FINAL_STATES]
            if len(finished) >= tasks and all(rec.get("JobState") in FINAL_STATES for rec in current):
                return finished
            time.sleep(1)
        self.cancel_stuck(job_id, list(seen.values()), timeout)
        raise AssertionError("unreachable")  # cancel_stuck raises

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of `states` (e.g. RUNNING); cancel and raise if it never is."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.job_records(job_id)
            if records and records[0].get("JobState") in states:
                return records[0]
            time.sleep(0.5)
        self.cancel_stuck(job_id, records, timeout, wanted=states)
        raise AssertionError("unreachable")

    def cancel(self, job_id: str) -> None:
        """Cancel for good: a job that is not requeueable cannot come back however its tasks react."""
        cancel_jobs(self.env, [str(job_id)])

    def cancel_stuck(self, job_id: str, records: list[dict], timeout: float, wanted=None) -> None:
        """Cancel a job that overran its wait, and raise with what it was doing."""
        self.cancel(job_id)
        summary = [(rec.get("JobId"), rec.get("JobState"), rec.get("Reason")) for rec in records]
        what = f"reached none of {sorted(wanted)}" if wanted else "did not finish"
        raise ClusterError(f"job {job_id} {what} within {timeout:.0f} s and was cancelled: {summary}")

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a job; returns its id (the array's id for an array)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def sbatch_wait(self, *args: str, env: dict[str, str] | None = None, timeout: float) -> tuple[str, int]:
        """`sbatch --wait`: returns (job id, sbatch's exit code = the job's); cancels the job on timeout."""
        proc = subprocess.Popen(
            ["sbatch", "--parsable", "--wait", *args],
            env=env or self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            job_id = out.strip().split(";")[0]
            if job_id:
                self.cancel_stuck(job_id, self.job_records(job_id), timeout)
            raise ClusterError(f"sbatch --wait {' '.join(args)} did not return in {timeout:.0f} s") from None
        job_id = out.strip().splitlines()[0].split(";")[0] if out.strip() else ""
        if not job_id:
            raise ClusterError(f"sbatch {' '.join(args)} failed: {err.strip()}")
        return job_id, proc.returncode

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.layout.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log}\n" + "\n".join(text))
        return "\n".join(parts)


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show -o` output as a dict (values never contain spaces there)."""
    record = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            record[key] = value
    return record


def write_munge_key(layout: ClusterLayout) -> Path:
    """A fresh random munge key owned by the munge user (munged refuses keys others can read)."""
    munge = pwd.getpwnam("munge")
    layout.munge_dir.mkdir(parents=True, exist_ok=True)
    os.chown(layout.munge_dir, munge.pw_uid, munge.pw_gid)
    os.chmod(layout.munge_dir, 0o700)
    key = layout.munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    os.chmod(key, 0o400)
    return key


def spawn(layout: ClusterLayout, name: str, argv: list[str], env: dict[str, str], user=None) -> int:
    """Start a daemon in the foreground of its own session, log to a file, record its pid."""
    log = open(layout.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - the daemon keeps it open
    kwargs = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kwargs,
    )
    log.close()
    layout.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def wait_for(predicate, timeout: float, what: str, layout: ClusterLayout) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise ClusterError(f"{what} within {timeout:.0f} s; logs under {layout.log_dir}")


def start_cluster(root: Path = DEFAULT_DIR, n_nodes: int = 2, timeout: float = 90) -> SlurmCluster:
    """Write the config, start munged, slurmctld and `n_nodes` slurmd, and wait until nodes are idle."""
    reason = unavailable_reason()
    if reason:
        raise ClusterError(reason)
    layout = ClusterLayout(Path(root).resolve())
    if any(layout.pid_file(name).exists() for name in ("munged", "slurmctld")):
        stop_cluster(layout.root)
    shutil.rmtree(layout.root, ignore_errors=True)
    for sub in ("etc", "state", "spool", "log", "pids", "run"):
        (layout.root / sub).mkdir(parents=True, exist_ok=True)
    # The munge user must reach its socket and key below this directory.
    os.chmod(layout.root, 0o755)
    nodes = [f"n{i + 1}" for i in range(n_nodes)]
    ports = free_ports(1 + n_nodes)
    cpus = max(2, os.cpu_count() or 1)
    layout.conf.write_text(slurm_conf_text(layout, nodes, ports, cpus))
    (layout.root / "etc" / "cgroup.conf").write_text(cgroup_conf_text())
    (layout.root / "etc" / "plugstack.conf").write_text("")
    env = {**os.environ, "SLURM_CONF": str(layout.conf)}
    cluster = SlurmCluster(layout, nodes, env)
    try:
        start_munged(layout, env)
        spawn(layout, "slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(layout.conf)], env)
        wait_for(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, 30,
                 "slurmctld did not answer `scontrol ping`", layout)  # fmt: skip
        slurmd = find_binary("slurmd")
        for name in nodes:
            spawn(layout, f"slurmd.{name}", [slurmd, "-D", "-N", name, "-f", str(layout.conf)], env)
        cluster.wait_idle(timeout)
    except BaseException:
        stop_cluster(layout.root)
        raise
    return cluster


def start_munged(layout: ClusterLayout, env: dict[str, str]) -> None:
    key = write_munge_key(layout)
    d = layout.munge_dir
    argv = [find_binary("munged"), "-F", "--force", f"--key-file={key}", f"--socket={layout.munge_socket}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}"]  # fmt: skip
    spawn(layout, "munged", argv, env, user=pwd.getpwnam("munge"))
    wait_for(layout.munge_socket.exists, 15, "munged did not create its socket", layout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reap it if it is our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def cancel_jobs(env: dict[str, str], jobs: list[str]) -> None:
    """`scancel`, after marking the jobs not requeueable (a task that answers SIGTERM with `scontrol
    requeue` would otherwise bring a cancelled job back)."""
    for job in jobs:
        argv = ["scontrol", "update", f"JobId={job}", "Requeue=0"]
        subprocess.run(argv, env=env, capture_output=True, timeout=30)
    subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=30)


def cancel_all_jobs(layout: ClusterLayout, timeout: float = 30) -> None:
    """Cancel every job of the cluster and wait for the queue to empty (slurmstepd outlives slurmd)."""
    env = {**os.environ, "SLURM_CONF": str(layout.conf)}

    def queue() -> list[str]:
        argv = ["squeue", "-h", "-o", "%i"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        return proc.stdout.split() if proc.returncode == 0 else []

    jobs = queue()
    if not jobs:
        return
    cancel_jobs(env, jobs)
    deadline = time.monotonic() + timeout
    while queue() and time.monotonic() < deadline:
        time.sleep(0.5)


def stop_cluster(root: Path = DEFAULT_DIR) -> list[str]:
    """Cancel all jobs, then stop slurmd(s), slurmctld and munged by their recorded pids."""
    layout = ClusterLayout(Path(root).resolve())
    pid_dir = layout.root / "pids"
    if not pid_dir.is_dir():
        return []
    ctld = layout.pid_file("slurmctld")
    if ctld.exists() and pid_alive(int(ctld.read_text())):
        # Stopping the daemons matters more than a clean queue.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            cancel_all_jobs(layout)
    # Our own pid files (the daemons' own ones are under run/): slurmd first, munged last.
    order = sorted(pid_dir.glob("slurmd.*.pid")) + [ctld, layout.pid_file("munged")]
    stopped = []
    for pid_file in order:
        if not pid_file.exists():
            continue
        stop_pid(int(pid_file.read_text()))
        pid_file.unlink()
        stopped.append(pid_file.stem)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"cluster directory [{DEFAULT_DIR}]")
    parser.add_argument("--nodes", type=int, default=2, help="number of slurmd (nodes) [2]")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stopped = stop_cluster(args.dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    try:
        cluster = start_cluster(args.dir, args.nodes)
    except ClusterError as err:
        print(f"slurm_cluster: {err}", file=sys.stderr)
        return 1
    print(f"SLURM cluster up: nodes {', '.join(cluster.nodes)} idle; logs in {cluster.layout.log_dir}")
    print(f"export SLURM_CONF={cluster.layout.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
