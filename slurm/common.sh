# Shared by slurm/train.sbatch and slurm/compare.sbatch (sourced, not run).
#
# Environment (all optional; sbatch passes the submitting shell's environment to the job):
#   SPANQA_ROOT        the spanqa checkout                          [the directory sbatch ran in]
#   SPANQA_PYTHON      the Python that has spanqa installed         [python on PATH]
#   SPANQA_RUNS_DIR    where default output directories go          [$SPANQA_ROOT/runs]
#   SPANQA_OUTPUT_DIR  this job's output dir (--output_dir wins)    [$SPANQA_RUNS_DIR/<job name>-<job id>]
#   MLFLOW_TRACKING_URI                                             [sqlite:///$SPANQA_ROOT/mlflow.db]
#   SPANQA_MASTER_PORT rendezvous port                              [20000 + job id % 20000]
#   OMP_NUM_THREADS                                                 [--cpus-per-task, else 1]

set -euo pipefail

SPANQA_ROOT=${SPANQA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
SPANQA_PYTHON=${SPANQA_PYTHON:-python}
SPANQA_RUNS_DIR=${SPANQA_RUNS_DIR:-$SPANQA_ROOT/runs}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$SPANQA_ROOT/mlflow.db}
# More threads than cores per rank makes every rank several times slower on CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The value of flag NAME in the remaining arguments ("--name VALUE" or "--name=VALUE"; the last wins).
flag_value() {
    local name=$1 value=""
    shift
    while (($#)); do
        case $1 in
            "$name") value=${2:-}; shift ;;
            "$name"=*) value=${1#*=} ;;
        esac
        shift
    done
    printf '%s' "$value"
}

# The job's name for output paths: JOBID, or ARRAYJOBID_TASKID for an array task (stable across requeues).
job_key() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        printf '%s_%s' "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID"
    else
        printf '%s' "$SLURM_JOB_ID"
    fi
}

# The address of the job's first node: its NodeAddr in slurm.conf (what SLURM itself uses to reach
# it), which is its host name on most clusters and an IP where several nodes share a host.
first_node_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node -o "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    printf '%s' "${addr:-$first}"
}

# A new SQLite MLflow store is created by whichever process opens it first; two jobs starting at once
# (the compare array) would both try to create its tables. Create it once, under a lock.
init_mlflow_store() {
    [[ $MLFLOW_TRACKING_URI == sqlite:///* ]] || return 0
    local db=${MLFLOW_TRACKING_URI#sqlite:///}
    [[ $db == /* ]] || db=$PWD/$db
    [[ -s $db ]] && return 0
    mkdir -p "$(dirname "$db")"
    flock "$db.lock" "$SPANQA_PYTHON" -c \
        'import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()' "$MLFLOW_TRACKING_URI"
}

# Run "$@" as one srun step and forward the preemption warning to it: SLURM delivers `--signal=B:USR1`
# and `scancel --signal=USR1 --batch` to this batch shell only, and bash runs a trap only between
# commands, so srun runs in the background and the shell waits for it, signals srun (which signals
# every task on every node), and waits again. SIGTERM (scancel, a requeue, a preemption) reaches the
# tasks from SLURM itself: the shell only keeps waiting, so that the tasks can save; forwarding it
# would make srun kill the step at once. Returns srun's exit status.
run_step_forwarding_signals() {
    local rc
    STEP_PID=""
    srun --kill-on-bad-exit=1 "$@" &
    STEP_PID=$!
    trap 'forward_signal USR1' USR1
    trap 'echo "spanqa: batch shell got SIGTERM, waiting for the tasks to save"' TERM
    while kill -0 "$STEP_PID" 2>/dev/null; do
        wait "$STEP_PID" || true
    done
    rc=0
    wait "$STEP_PID" || rc=$?
    trap - USR1 TERM
    return "$rc"
}

forward_signal() {
    echo "spanqa: batch shell got SIG$1, forwarding it to the tasks"
    kill -s "$1" "$STEP_PID" 2>/dev/null || true
}
