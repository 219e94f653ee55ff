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
if [[ -n "$HOSTFILE" ]]; then
  read_hostfile "$HOSTFILE"
else
  [[ -n "$NODES" && -n "$NPROC" ]] || die "give --hostfile, or --nodes and --nproc"
  names=()
  for ((i = 0; i < NODES; i++)); do names+=("node$i"); done
  write_hostfile "$NPROC" "${names[@]}"
fi
(( NODE_RANK < ${#HOSTS[@]} )) || die "--node-rank $NODE_RANK is out of range: the hostfile lists ${#HOSTS[@]} nodes"
hostfile_world
setup_env "$repo"
# Node 0 hosts the rendezvous and takes the run directory's lock; every node's ranks share the token.
export SPARSEMIXER_RUN_TOKEN=${SPARSEMIXER_RUN_TOKEN:-"nodes-$MASTER_ADDR_OPT:$MASTER_PORT_OPT"}
if [[ $NODE_RANK == 0 ]]; then preflight "$WORLD" "$MASTER_ADDR_OPT"; else preflight "$WORLD" "" 0; fi
[[ $DRY_RUN == 0 ]] || echo "# hostfile $HOSTFILE: $(paste -sd, "$HOSTFILE")"
run_cmd deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR_OPT" \
  --master_port "$MASTER_PORT_OPT" --no_local_rank --module "${TRAIN[@]}"
