#!/usr/bin/env bash
# One node, N processes, the deepspeed launcher: sparsemixer-ds train on every rank (CPU or GPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh [--config FILE] [--ds-config FILE] [--nproc N] [--master-port PORT]
                       [--dry-run] [--] [train options, e.g. --set train.steps=50 --resume]

  --config FILE       YAML run config (default: configs/cpu_small.yaml)
  --ds-config FILE    DeepSpeed JSON; overrides the run config's ds_config
  --nproc N           processes on this node (default: 2); must be a multiple of moe.ep_size
  --master-port PORT  rendezvous port (default: 29500)
  --dry-run           print the command instead of running it
Everything after the options (or after --) goes to `sparsemixer-ds train`.
USAGE
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=configs/cpu_small.yaml ds_config="" nproc=2 port=29500 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --ds-config) ds_config=${2:?--ds-config needs a file}; shift 2 ;;
    --nproc) nproc=${2:?--nproc needs a number}; shift 2 ;;
    --master-port) port=${2:?--master-port needs a number}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ -f "$config" ]] || { echo "launch/local.sh: run config '$config' does not exist (see configs/)" >&2; exit 2; }
[[ -z "$ds_config" || -f "$ds_config" ]] || { echo "launch/local.sh: DeepSpeed config '$ds_config' does not exist (see ds_configs/)" >&2; exit 2; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; }
[[ "$port" =~ ^[0-9]+$ ]] || { echo "launch/local.sh: --master-port must be a port number, got '$port'" >&2; exit 2; }

# The project's venv first on PATH: its deepspeed launcher, python and ninja (the one that built the cached ops).
[[ -x "$repo/.venv/bin/deepspeed" ]] && export PATH="$repo/.venv/bin:$PATH"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

cmd=(deepspeed --num_gpus "$nproc" --master_port "$port" --no_local_rank --module sparsemixer_ds.cli train --config "$config")
[[ -n "$ds_config" ]] && cmd+=(--set "ds_config=$ds_config")
cmd+=("$@")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
