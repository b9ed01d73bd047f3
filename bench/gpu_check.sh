#!/usr/bin/env bash
# The GPU check: every GPU path of spanqa in one bounded run, logs and JSON into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR              # on a CUDA machine, with .wheels/ from `make gpu-wheels`
#   bash bench/gpu_check.sh --dry-run OUTDIR    # on CPU with tiny sizes (also: SPANQA_GPU_CHECK_CPU=1)
#
# PYTHON picks the interpreter (default: python3, the one that holds the image's CUDA torch). The
# steps, their time limits and the files they write: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
