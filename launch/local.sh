#!/usr/bin/env bash
# One node, N processes, the deepspeed launcher: sparsemixer-ds train on every rank (CPU or GPU).
set -euo pipefail
LAUNCH_NAME=launch/local.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/common.sh"

usage() {
  echo "usage: launch/local.sh [--config FILE] [--ds-config FILE] [--nproc N] [--master-port PORT] [--dry-run] [-- TRAIN ARGS]"
  echo "  --nproc defaults to 2 and must be a multiple of moe.ep_size."
  common_usage
}

parse_args "config ds-config nproc master-port dry-run" "$@"
NPROC=${NPROC:-2}
setup_env "$repo"
preflight "$NPROC" 127.0.0.1
run_cmd deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT_OPT" --no_local_rank --module "${TRAIN[@]}"
