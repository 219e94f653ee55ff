#!/usr/bin/env bash
# Per-node launch without ssh: run this once on every node (a scheduler, Kubernetes or cloud batch
# starts one copy per node); `deepspeed --no_ssh` starts this node's processes and all nodes meet at
# MASTER_ADDR:MASTER_PORT.
set -euo pipefail
LAUNCH_NAME=launch/node.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/common.sh"

usage() {
  echo "usage: launch/node.sh --node-rank R --master-addr ADDR (--hostfile FILE | --nodes N --nproc K)"
  echo "                      [--config FILE] [--ds-config FILE] [--master-port PORT] [--dry-run] [-- TRAIN ARGS]"
  echo "  Every node runs it with the same options except --node-rank (0 on the master's node)."
  echo "  Without --hostfile, one is written for N nodes of K processes (the names do not matter without ssh)."
  common_usage
}

parse_args "config ds-config nodes nproc hostfile master-addr master-port node-rank dry-run" "$@"
[[ -n "$NODE_RANK" ]] || die "--node-rank is required (0 on the master's node)"
[[ -n "$MASTER_ADDR_OPT" ]] || die "--master-addr is required: the address of node rank 0, reachable from every node"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ -z "$HOSTFILE" ]]; then
  [[ -n "$NODES" && -n "$NPROC" ]] || die "give --hostfile, or --nodes and --nproc"
  HOSTFILE=$tmp/hostfile
  for ((i = 0; i < NODES; i++)); do echo "node$i slots=$NPROC"; done >"$HOSTFILE"
fi
read_hostfile "$HOSTFILE"
(( NODE_RANK < ${#HOSTS[@]} )) || die "--node-rank $NODE_RANK is out of range: the hostfile lists ${#HOSTS[@]} nodes"
world=0
for s in "${SLOTS[@]}"; do world=$((world + s)); done
setup_env "$repo"
preflight "$world"
[[ $DRY_RUN == 0 ]] || echo "# hostfile $HOSTFILE: $(paste -sd, "$HOSTFILE")"
run_cmd deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR_OPT" \
  --master_port "$MASTER_PORT_OPT" --no_local_rank --module sparsemixer_ds.cli train --config "$CONFIG" "${TRAIN_ARGS[@]}"
