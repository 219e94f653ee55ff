# Shared by the launch scripts (sourced, not run): one option interface, input checks, the environment.
# Every value stays in a bash array and reaches the command as one argument; nothing is eval'd, so a
# path or override with shell metacharacters is passed literally.

LAUNCH_NAME=${LAUNCH_NAME:-launch}
CONFIG=configs/cpu_small.yaml
DS_CONFIG=""
NODES=""
NPROC=""
MASTER_ADDR_OPT=""
MASTER_PORT_OPT=29500
HOSTFILE=""
NODE_RANK=""
DRY_RUN=0
NO_SSH_CHECK=0
VIA_DEEPSPEED=0
MPIRUN_ARGS=()
TRAIN_ARGS=()
TRAIN=()

die() {
  echo "$LAUNCH_NAME: $*" >&2
  exit 2
}

common_usage() {
  cat <<'USAGE'
Options (each script takes the ones its usage lists):
  --config FILE        YAML run config (default: configs/cpu_small.yaml)
  --ds-config FILE     DeepSpeed JSON; overrides the run config's ds_config
  --nodes N            number of nodes
  --nproc N            processes per node
  --hostfile FILE      DeepSpeed/Open MPI hostfile: one 'HOST slots=N' per line
  --master-addr ADDR   address of the rank-0 node
  --master-port PORT   rendezvous port (default: 29500)
  --node-rank R        this node's index (per-node launch)
  --dry-run            print the command(s) instead of running them
  -h, --help           this text
Everything after the options (or after --) goes to `sparsemixer-ds train`, e.g. --set train.steps=50 --resume.
USAGE
}

# parse_args ACCEPTED "$@": ACCEPTED names the long options this script takes, e.g. "config nproc".
parse_args() {
  local accepted=" $1 "
  shift
  while [[ $# -gt 0 ]]; do
    local opt=$1
    case "$opt" in
      -h|--help) usage; exit 0 ;;
      --) shift; break ;;
      --*) ;;
      *) break ;;
    esac
    local name=${opt#--}
    [[ "$accepted" == *" $name "* ]] || die "option $opt is not one of this script's (see --help)"
    case "$name" in
      dry-run) DRY_RUN=1; shift; continue ;;
      no-ssh-check) NO_SSH_CHECK=1; shift; continue ;;
      via-deepspeed) VIA_DEEPSPEED=1; shift; continue ;;
    esac
    [[ $# -ge 2 ]] || die "option $opt needs a value"
    case "$name" in
      config) CONFIG=$2 ;;
      ds-config) DS_CONFIG=$2 ;;
      nodes) NODES=$2 ;;
      nproc) NPROC=$2 ;;
      hostfile) HOSTFILE=$2 ;;
      master-addr) MASTER_ADDR_OPT=$2 ;;
      master-port) MASTER_PORT_OPT=$2 ;;
      node-rank) NODE_RANK=$2 ;;
      mpirun-arg) MPIRUN_ARGS+=("$2") ;;
    esac
    shift 2
  done
  TRAIN_ARGS=("$@")
  [[ -f "$CONFIG" ]] || die "run config '$CONFIG' does not exist (see configs/)"
  if [[ -n "$DS_CONFIG" ]]; then
    [[ -f "$DS_CONFIG" ]] || die "DeepSpeed config '$DS_CONFIG' does not exist (see ds_configs/)"
    TRAIN_ARGS=(--set "ds_config=$DS_CONFIG" "${TRAIN_ARGS[@]}")
  fi
  # What every rank runs after `python -m` (or `deepspeed ... --module`): the trainer's command line.
  TRAIN=(sparsemixer_ds.cli train --config "$CONFIG" "${TRAIN_ARGS[@]}")
  [[ -z "$NODES" ]] || positive_int --nodes "$NODES"
  [[ -z "$NPROC" ]] || positive_int --nproc "$NPROC"
  [[ "$MASTER_PORT_OPT" =~ ^[0-9]+$ && "$MASTER_PORT_OPT" -ge 1 && "$MASTER_PORT_OPT" -le 65535 ]] ||
    die "--master-port must be a port number (1-65535), got '$MASTER_PORT_OPT'"
  [[ -z "$MASTER_ADDR_OPT" ]] || valid_host --master-addr "$MASTER_ADDR_OPT"
  [[ -z "$NODE_RANK" || "$NODE_RANK" =~ ^[0-9]+$ ]] || die "--node-rank must be an integer >= 0, got '$NODE_RANK'"
}

positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

valid_host() {
  # Host names and addresses only: letters, digits, '.', '-', '_', ':' (IPv6). Anything else is refused.
  [[ "$2" =~ ^[A-Za-z0-9._:-]+$ ]] || die "$1: '$2' is not a host name or address"
}

# read_hostfile FILE: HOSTS and SLOTS arrays from 'HOST slots=N' lines (comments and blank lines skipped).
read_hostfile() {
  local file=$1 line host slots n=0
  [[ -f "$file" ]] || die "hostfile '$file' does not exist"
  HOSTS=() SLOTS=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line=${line%%#*}
    [[ "$line" =~ ^[[:space:]]*$ ]] && continue
    if [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
      host=${BASH_REMATCH[1]} slots=${BASH_REMATCH[2]}
    else
      die "hostfile '$file' line $n: expected 'HOST slots=N', got '$line'"
    fi
    valid_host "hostfile '$file' line $n" "$host"
    [[ "$slots" -ge 1 ]] || die "hostfile '$file' line $n: slots must be >= 1"
    HOSTS+=("$host") SLOTS+=("$slots")
  done <"$file"
  [[ ${#HOSTS[@]} -ge 1 ]] || die "hostfile '$file' lists no host"
}

# hostfile_world [NODES [NPROC]]: WORLD, the ranks on the first NODES hosts that read_hostfile read (default:
# all of them), NPROC on each (at most its slots) or, without NPROC, as many as each host has slots.
hostfile_world() {
  local nodes=${1:-${#HOSTS[@]}} nproc=${2:-} slots i
  (( nodes <= ${#HOSTS[@]} )) || die "--nodes $nodes exceeds the ${#HOSTS[@]} hosts of '$HOSTFILE'"
  WORLD=0
  for ((i = 0; i < nodes; i++)); do
    slots=${SLOTS[i]}
    if [[ -n "$nproc" ]]; then
      (( nproc <= slots )) || die "--nproc $nproc exceeds the $slots slots of ${HOSTS[i]} in '$HOSTFILE'"
      slots=$nproc
    fi
    WORLD=$((WORLD + slots))
  done
}

# launch_tmp: LAUNCH_TMP, a directory of this launch's own files, removed when the script exits.
launch_tmp() {
  if [[ -z "${LAUNCH_TMP:-}" ]]; then
    LAUNCH_TMP=$(mktemp -d)
  fi
}

# On exit: this launch's files go, and so does the run directory's lock if the script still holds it
# (the ranks never took it over: the launch failed before they started).
cleanup() {
  [[ -z "${LAUNCH_TMP:-}" ]] || rm -rf "$LAUNCH_TMP"
  if [[ -n "${LOCK_FILE:-}" ]] && grep -q "\"pid\": $$," "$LOCK_FILE" 2>/dev/null; then
    rm -f "$LOCK_FILE"
  fi
}
trap cleanup EXIT

# write_hostfile NPROC HOST...: HOSTFILE, a generated hostfile with NPROC slots on each HOST, then read it.
write_hostfile() {
  local nproc=$1 host
  shift
  launch_tmp
  HOSTFILE=$LAUNCH_TMP/hostfile
  for host in "$@"; do echo "$host slots=$nproc"; done >"$HOSTFILE"
  read_hostfile "$HOSTFILE"
}

# The project's venv first on PATH (its deepspeed, python and the ninja that built the cached ops),
# and DeepSpeed's CPU accelerator where there is no GPU.
setup_env() {
  local repo=$1
  [[ -x "$repo/.venv/bin/python" ]] && export PATH="$repo/.venv/bin:$PATH"
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  fi
  command -v python >/dev/null || die "no python on PATH; run 'make setup' first"
}

# preflight WORLD [MASTER_ADDR [LOCK]]: the run's configs, data and run directory checked for WORLD ranks,
# before any starts; the rendezvous port checked where MASTER_ADDR is this host. Unless --dry-run or LOCK=0,
# the script takes the run directory's lock (one run per directory), which rank 0 takes over;
# SPARSEMIXER_RUN_TOKEN tells the launch's own processes from another launch's.
preflight() {
  local args=(--config "$CONFIG" --world-size "$1") out
  [[ -z "${2:-}" ]] || args+=(--master-addr "$2" --master-port "$MASTER_PORT_OPT")
  export SPARSEMIXER_RUN_TOKEN=${SPARSEMIXER_RUN_TOKEN:-"$(hostname)-$$-$(date +%s%N)"}
  [[ $DRY_RUN == 1 || "${3:-1}" == 0 ]] || args+=(--lock)
  out=$(python -m sparsemixer_ds.cli check "${args[@]}" "${TRAIN_ARGS[@]}") ||
    die "refusing to launch: fix the error above"
  echo "$out" >&2
  LOCK_FILE=$(sed -n 's/^lock: //p' <<<"$out")
}

# run_cmd CMD...: print it (--dry-run) or run it to its end. TERM, INT or HUP to this script (preemption,
# Ctrl-C, a closed terminal) reaches the job's ranks as SIGTERM: each finishes its step, saves a checkpoint
# and exits (sparsemixer_ds/run/stop.py), and the script exits with the launcher's code once they have; where
# the ranks are not this script's descendants (srun's tasks, pdsh's remote nodes) the launcher passes it on.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@"
    echo
    return
  fi
  "$@" &
  JOB_PID=$!
  trap stop_job TERM INT HUP
  local rc
  while :; do
    wait "$JOB_PID" && rc=0 || rc=$?
    kill -0 "$JOB_PID" 2>/dev/null || return "$rc"  # else a trapped signal interrupted the wait
  done
}

stop_job() {
  local ranks
  ranks=$(rank_pids "$JOB_PID")
  echo "$LAUNCH_NAME: stopping: each rank saves a checkpoint and exits (train.stop_grace_s bounds it)" >&2
  # shellcheck disable=SC2086  # one pid per word
  kill -TERM ${ranks:-$JOB_PID} 2>/dev/null || true
}

# rank_pids PID: the training ranks among PID's descendants on this host.
rank_pids() {
  local child argv
  for child in $(pgrep -P "$1"); do
    argv=()
    mapfile -d '' -t argv <"/proc/$child/cmdline" 2>/dev/null || true
    # python [-u] -m sparsemixer_ds.cli train (mpirun's and DeepSpeed's command lines hold it too)
    if [[ "${argv[0]:-}" == *python* && " ${argv[*]} " == *" -m sparsemixer_ds.cli train "* ]]; then
      echo "$child"
    else
      rank_pids "$child"
    fi
  done
}
