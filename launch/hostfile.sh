#!/usr/bin/env bash
# Several nodes from one: the deepspeed launcher reads a hostfile and starts every node's processes
# over ssh through pdsh (DeepSpeed's default multi-node runner). Needs password-less ssh to every
# host and the same repository path on all of them (a shared file system).
set -euo pipefail
LAUNCH_NAME=launch/hostfile.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/common.sh"

usage() {
  echo "usage: launch/hostfile.sh --hostfile FILE [--nodes N] [--nproc K] [--master-addr ADDR] [--master-port PORT]"
  echo "                          [--config FILE] [--ds-config FILE] [--no-ssh-check] [--dry-run] [-- TRAIN ARGS]"
  echo "  --nodes/--nproc use the first N hosts / K slots of each (default: all of the hostfile)."
  echo "  --master-addr defaults to the first host. ssh options for pdsh: PDSH_SSH_ARGS_APPEND (e.g. '-p 2222');"
  echo "  --no-ssh-check skips DeepSpeed's own ssh probe, which ignores PDSH_SSH_ARGS_APPEND."
  common_usage
}

parse_args "config ds-config nodes nproc hostfile master-addr master-port no-ssh-check dry-run" "$@"
[[ -n "$HOSTFILE" ]] || die "--hostfile is required: one 'HOST slots=N' line per node"
read_hostfile "$HOSTFILE"
nodes=${NODES:-${#HOSTS[@]}}
hostfile_world "$nodes" "$NPROC"
master=${MASTER_ADDR_OPT:-${HOSTS[0]}}
setup_env "$repo"
preflight "$WORLD" "$master"

# DeepSpeed forwards only a few variable prefixes to the other nodes; the rest goes in an env file.
launch_tmp
env_file=$LAUNCH_TMP/env
{
  echo "PATH=$PATH"
  echo "SPARSEMIXER_RUN_TOKEN=$SPARSEMIXER_RUN_TOKEN"
  [[ -z "${DS_ACCELERATOR:-}" ]] || echo "DS_ACCELERATOR=$DS_ACCELERATOR"
} >"$env_file"
export DS_ENV_FILE=$env_file
cmd=(deepspeed --hostfile "$HOSTFILE" --master_addr "$master" --master_port "$MASTER_PORT_OPT" --num_nodes "$nodes")
[[ -z "$NPROC" ]] || cmd+=(--num_gpus "$NPROC")
[[ $NO_SSH_CHECK == 0 ]] || cmd+=(--no_ssh_check)
cmd+=(--no_local_rank --module "${TRAIN[@]}")
[[ $DRY_RUN == 0 ]] || echo "# DS_ENV_FILE: $(paste -sd' ' "$env_file")"
run_cmd "${cmd[@]}"
