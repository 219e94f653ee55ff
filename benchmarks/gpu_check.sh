#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): set-up, then the gate, bf16 training steps with tokens/s and MFU, and
# peak memory against the planner, in about 10 minutes on one H200. Results: benchmarks/results/gpu_check/.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--smoke]
#
# Set-up: the python that holds the GPU's torch (PYTHON, else the project's .venv, else python3) gets this
# project and whatever it lacks of its requirements (deepspeed, transformers, ...), from the package index,
# or with --wheels DIR from wheels in DIR alone (a machine without network). Its torch is never replaced.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

WHEELS=""
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --wheels needs a directory" >&2; exit 2; }; WHEELS=$2; shift 2 ;;
    --out) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; ARGS+=(--out "$2"); shift 2 ;;
    --smoke) ARGS+=(--smoke); shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z "$WHEELS" || -d "$WHEELS" ]] || { echo "gpu_check.sh: --wheels $WHEELS is not a directory" >&2; exit 2; }

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch" 2>/dev/null || { echo "gpu_check.sh: $PY has no torch; set PYTHON to the one with the GPU's torch" >&2; exit 2; }

if ! "$PY" -c "import deepspeed, transformers, sparsemixer_ds" 2>/dev/null; then
  # Pin the installed torch, so that pip keeps it whatever the requirements' ranges would allow.
  pin=$(mktemp)
  "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$pin"
  source=()
  [[ -z "$WHEELS" ]] || source=(--no-index --find-links "$WHEELS")
  echo "gpu_check.sh: installing the project and its missing requirements into $PY" >&2
  "$PY" -m pip install -q "${source[@]}" -c "$pin" -e .
  rm -f "$pin"
fi

# The launcher and the ninja that builds DeepSpeed's ops: this python's, first on PATH.
bin=$("$PY" -c "import sys, os; print(os.path.dirname(os.path.realpath(sys.executable)))")
export PATH="$bin:$PATH"
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
exec "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
