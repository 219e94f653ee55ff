#!/usr/bin/env bash
# MPI: mpirun starts every rank; mpi4py tells each its rank, world size and local rank (see
# sparsemixer_ds.run.comm.discover_mpi). With --via-deepspeed, DeepSpeed's own `--launcher openmpi`
# builds the mpirun command from the hostfile instead.
set -euo pipefail
LAUNCH_NAME=launch/mpi.sh
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/common.sh"

usage() {
  echo "usage: launch/mpi.sh (--nproc K [--nodes 1] | --hostfile FILE) [--master-addr ADDR] [--master-port PORT]"
  echo "                     [--mpirun-arg ARG ...] [--via-deepspeed] [--config FILE] [--ds-config FILE]"
  echo "                     [--dry-run] [-- TRAIN ARGS]"
  echo "  Without --hostfile, K processes on this host. --mpirun-arg passes one argument to mpirun"
  echo "  (repeatable), e.g. --mpirun-arg --oversubscribe; ranks are not bound to cores unless you pass"
  echo "  --mpirun-arg --bind-to --mpirun-arg core. --master-addr defaults to 127.0.0.1 on one"
  echo "  host and to the hostfile's first host otherwise."
  common_usage
}

parse_args "config ds-config nodes nproc hostfile master-addr master-port mpirun-arg via-deepspeed dry-run" "$@"
if [[ -n "$HOSTFILE" ]]; then
  [[ -z "$NPROC$NODES" ]] || die "give either --hostfile or --nproc, not both: the hostfile's slots set the ranks"
  read_hostfile "$HOSTFILE"
  master=${MASTER_ADDR_OPT:-${HOSTS[0]}}
else
  [[ -n "$NPROC" ]] || die "give --nproc K (ranks on this host) or --hostfile FILE"
  [[ -z "$NODES" || "$NODES" == 1 ]] || die "--nodes > 1 needs --hostfile to say which hosts"
  write_hostfile "$NPROC" localhost
  master=${MASTER_ADDR_OPT:-127.0.0.1}
fi
hostfile_world
setup_env "$repo"
preflight "$WORLD" "$master"

mpi_args=()
[[ $EUID != 0 ]] || mpi_args+=(--allow-run-as-root)  # Open MPI refuses root unless told
# Open MPI pins each rank to one core by default, which starves PyTorch's intra-op threads (a 7x
# slower step here); leave placement to the OS unless the caller binds explicitly.
[[ " ${MPIRUN_ARGS[*]} " == *" --bind-to "* ]] || mpi_args+=(--bind-to none)
mpi_args+=("${MPIRUN_ARGS[@]}")
# What every rank needs from here, remote hosts included (mpirun forwards nothing else by itself).
mpi_args+=(-x PATH -x "MASTER_ADDR=$master" -x "MASTER_PORT=$MASTER_PORT_OPT" -x SPARSEMIXER_RUN_TOKEN)
[[ -z "${DS_ACCELERATOR:-}" ]] || mpi_args+=(-x "DS_ACCELERATOR=$DS_ACCELERATOR")
[[ $DRY_RUN == 0 ]] || echo "# hostfile $HOSTFILE: $(paste -sd, "$HOSTFILE")"
if [[ $VIA_DEEPSPEED == 1 ]]; then
  # --force_multi: the MPI runner even for one host. mpirun reaches other hosts itself; DeepSpeed's ssh
  # probe is for its pdsh runner. DeepSpeed splits --launcher_args with shlex, so they are quoted here.
  run_cmd deepspeed --launcher openmpi --force_multi --launcher_args "$(printf '%q ' "${mpi_args[@]}")" \
    --hostfile "$HOSTFILE" --no_ssh_check --master_addr "$master" --master_port "$MASTER_PORT_OPT" --no_local_rank \
    --module "${TRAIN[@]}"
else
  [[ -z "${PYTHONPATH:-}" ]] || mpi_args+=(-x PYTHONPATH)
  run_cmd mpirun -n "$WORLD" --hostfile "$HOSTFILE" "${mpi_args[@]}" python -m "${TRAIN[@]}"
fi
