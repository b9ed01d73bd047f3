#!/usr/bin/env bash
# Install what the SLURM tests (tests/test_slurm*.py) need: Debian's slurmctld, slurmd, slurm-client
# and munge. Installs only as root with a working apt-get; otherwise says plainly why those tests
# will be skipped. Always exits 0: a machine without SLURM still runs every other test.
set -u

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(munged slurmctld slurmd sbatch srun scontrol scancel squeue sinfo)

missing_binaries() {
    local name missing=()
    for name in "${BINARIES[@]}"; do
        command -v "$name" >/dev/null 2>&1 || missing+=("$name")
    done
    echo "${missing[*]}"
}

skip() {
    echo "setup_slurm: the SLURM tests will be skipped: $*"
    exit 0
}

missing=$(missing_binaries)
if [[ -z $missing ]]; then
    [[ $(id -u) == 0 ]] || skip "SLURM is installed, but the tests need root (slurmd starts jobs as their user)"
    echo "setup_slurm: SLURM and munge are installed; the SLURM tests will run"
    exit 0
fi
[[ $(id -u) == 0 ]] || skip "not root, so cannot install ${PACKAGES[*]} (missing: $missing)"
command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install ${PACKAGES[*]} (missing: $missing)"

echo "setup_slurm: installing ${PACKAGES[*]} (missing: $missing)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/tmp/setup_slurm.log 2>&1; then
    skip "apt-get update failed (see /tmp/setup_slurm.log): $(tail -n 1 /tmp/setup_slurm.log)"
fi
if ! apt-get install -y -qq "${PACKAGES[@]}" >>/tmp/setup_slurm.log 2>&1; then
    skip "apt-get install ${PACKAGES[*]} failed (see /tmp/setup_slurm.log): $(tail -n 1 /tmp/setup_slurm.log)"
fi
missing=$(missing_binaries)
[[ -z $missing ]] || skip "installed ${PACKAGES[*]}, but still missing: $missing"
echo "setup_slurm: installed $(slurmd -V 2>/dev/null) and munge; the SLURM tests will run"
exit 0
