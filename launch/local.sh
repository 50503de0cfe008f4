#!/usr/bin/env bash
# Multi-host on one machine: N processes over 127.0.0.1, each with its own fake CPU devices, to
# test multi-process behaviour (jax.distributed, gloo collectives, per-process data shards,
# process-0-only writes, checkpoint save/restore) without a cluster.
#
#   launch/local.sh -n 2 -d 2 -- python -m pbe_jax.train --config=configs/pbe.py:demo \
#       --workdir=/tmp/pbe_mh --config.train.num_steps=3
#
# Every process runs CMD with `--coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=I` appended (the flags every pbe_jax CLI accepts) and JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=D in its environment, so the global mesh has
# N*D devices. Output goes to LOGDIR/proc_I.log; process 0's log is also streamed to stdout.
# The launcher exits with the first non-zero status of any process (the others are then stopped)
# or 0 when all succeed. Ctrl-C / SIGTERM is forwarded (pbe_jax.train checkpoints and exits).
# The coordination service runs in its own process (`python -m pbe_jax.tools.coordinator`, log
# LOGDIR/coordinator.log; the processes get PBE_JAX_COORDINATOR=external), so a dead process 0
# is a dead peer like any other: the others exit 75 with the watchdog's message.
#
# Options:
#   -n, --nproc N       processes (default 2)
#   -d, --devices D     fake CPU devices per process (default 2)
#   -p, --port P        coordinator port (default: random in 20000-39999)
#   -l, --logdir DIR    per-process logs (default: a new directory under ${TMPDIR:-/tmp})
#   --max_restarts N    restart a failed run up to N times (default 0), resuming from the newest
#                       checkpoint of CMD's --workdir; the same failure at the same step twice in
#                       a row stops; each restart is a row of WORKDIR/restarts.jsonl
#   --restart_backoff S seconds before the first restart, doubled for each next (default 10)
#   --coordinator WHERE service (default): the coordination service in its own process;
#                       process0: inside process 0 (JAX's default; its death aborts the others)
#   --dry-run           print the commands, start nothing (also DRY_RUN=1)

# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

nproc=2
devices=2
port=""
logdir=""
max_restarts=0
backoff=10
coordinator=service
while (($#)); do
  case "$1" in
    -n | --nproc) nproc=$2; shift 2 ;;
    -d | --devices) devices=$2; shift 2 ;;
    -p | --port) port=$2; shift 2 ;;
    -l | --logdir) logdir=$2; shift 2 ;;
    --max_restarts=*) max_restarts=${1#*=}; shift ;;
    --max_restarts) max_restarts=$2; shift 2 ;;
    --restart_backoff=*) backoff=${1#*=}; shift ;;
    --restart_backoff) backoff=$2; shift 2 ;;
    --coordinator=*) coordinator=${1#*=}; shift ;;
    --coordinator) coordinator=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (the command goes after --)" >&2; usage 2 ;;
  esac
done
(($#)) || { echo "no command given after --" >&2; usage 2; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer, got '$devices'"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max_restarts must be a count >= 0, got '$max_restarts'"
[[ "$backoff" =~ ^[0-9]+$ ]] || die "--restart_backoff must be whole seconds >= 0, got '$backoff'"
[[ "$coordinator" == service || "$coordinator" == process0 ]] ||
  die "--coordinator must be service or process0, got '$coordinator'"
cmd=("$@")
workdir="$(workdir_of "${cmd[@]}")"
if ((max_restarts > 0)) && [[ -z "$workdir" ]]; then
  die "--max_restarts needs the command's --workdir (the run resumes from its checkpoints)"
fi
fixed_port=$port

if [[ -z "$logdir" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    logdir="${TMPDIR:-/tmp}/pbe_local.XXXXXX"
  else
    logdir="$(mktemp -d "${TMPDIR:-/tmp}/pbe_local.XXXXXX")"
  fi
fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$logdir"

# Keep the caller's XLA flags except a device count of its own (ours must win).
xla_flags="$(printf '%s --xla_force_host_platform_device_count=%s' "${XLA_FLAGS:-}" "$devices" |
  sed -E 's/--xla_force_host_platform_device_count=[0-9]+ //g; s/ +/ /g; s/^ //')"

# start_group ATTEMPT: start the N processes (a new port per attempt unless -p), wait for them,
# return the first non-zero status (the others are stopped) or 0.
# shellcheck disable=SC2329 # called through run_attempt by supervise
start_group() {
  local attempt=$1 i log argv
  port=${fixed_port:-$((20000 + RANDOM % 20000))}
  echo "launcher: $nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port ($coordinator), logs in $logdir" >&2
  export PBE_JAX_COORDINATOR=process0
  if [[ "$coordinator" == service ]]; then
    PBE_JAX_COORDINATOR=external
    ((attempt == 0)) || [[ "$DRY_RUN" == 1 ]] || echo "==== launcher: restart $attempt" >>"$logdir/coordinator.log"
    start_coordinator "$(python_of "${cmd[@]}")" "127.0.0.1:$port" "$nproc" "$(heartbeat_of "${cmd[@]}")" \
      "$logdir/coordinator.log"
  fi
  pids=()
  for ((i = 0; i < nproc; i++)); do
    argv=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags" "${cmd[@]}"
      "--coordinator_address=127.0.0.1:$port" "--num_processes=$nproc" "--process_id=$i")
    log="$logdir/proc_$i.log"
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${argv[@]}"
      echo "  > $log"
      continue
    fi
    if ((attempt == 0)); then
      "${argv[@]}" >"$log" 2>&1 &
    else
      echo "==== launcher: restart $attempt" >>"$log"
      "${argv[@]}" >>"$log" 2>&1 &
    fi
    pids+=("$!")
    echo "$!" >"$logdir/proc_$i.pid"
  done
  [[ "$DRY_RUN" == 1 ]] && return 0
  local status=0
  wait_group "${pids[@]}" || status=$?
  stop_coordinator
  if ((status != 0)); then
    for ((i = 0; i < nproc; i++)); do
      echo "---- last lines of $logdir/proc_$i.log" >&2
      tail -n 20 "$logdir/proc_$i.log" >&2 || true
    done
  fi
  return "$status"
}

attempts=0
# shellcheck disable=SC2329 # called by supervise
run_attempt() {
  local attempt=$attempts
  attempts=$((attempts + 1))
  start_group "$attempt"
}

trap_group_signals
[[ "$DRY_RUN" == 1 ]] || follow_log "$logdir/proc_0.log"  # process 0's output, while it runs
record=""
if ((max_restarts > 0)) && [[ "$workdir" != *://* ]]; then
  record="$workdir/restarts.jsonl"
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$workdir"
fi
status=0
supervise "$max_restarts" "$backoff" "$workdir" "$record" run_attempt || status=$?
[[ "$DRY_RUN" == 1 ]] && exit 0
stop_following
echo "launcher: exit status $status (logs in $logdir)" >&2
exit "$status"
