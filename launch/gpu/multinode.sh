#!/usr/bin/env bash
# Multi-node GPU training without SLURM, torchrun-style: run this on every node with the same
# --nnodes / --master_addr / --master_port and that node's --node_rank.
#
#   # node 0 (10.0.0.1) and node 1, 8 GPUs each:
#   launch/gpu/multinode.sh --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 -- \
#       python -m pbe_jax.train --config=configs/pbe.py:sd15,mesh=data:-1,fsdp:8 --workdir=/shared/run
#   launch/gpu/multinode.sh --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 -- \
#       python -m pbe_jax.train --config=configs/pbe.py:sd15,mesh=data:-1,fsdp:8 --workdir=/shared/run
#
# --nproc_per_node=1 (default): one process per node driving all its GPUs.
# --nproc_per_node=G: G processes per node, process I sees only GPU I (CUDA_VISIBLE_DEVICES).
# Process ids are node_rank * nproc_per_node + local rank. Node 0's launcher runs the
# jax.distributed coordination service on --master_port, which every node must reach, in its own
# process (`python -m pbe_jax.tools.coordinator`, log LOGDIR/coordinator.log; every process gets
# PBE_JAX_COORDINATOR=external), so the death of any process, process 0 included, makes the
# others exit 75 with the watchdog's message; after a failure node 0 keeps the service up for the
# run's heartbeat + 30 s, so the other nodes' processes see it. --coordinator=process0: inside
# process 0 instead (JAX's default; its death aborts the others, exit 134). Collectives
# between GPUs use NCCL. Each process's output goes to LOGDIR/proc_<id>.log and the node's first
# process is streamed to stdout. Exit status: the first failure of a local process (the other
# local processes are then stopped), else 0. Ctrl-C / SIGTERM is forwarded (checkpoint, exit).
#
# Options (also as `--opt value`):
#   --nnodes=N  --node_rank=R  --master_addr=HOST  --master_port=PORT (default 12355)
#   --nproc_per_node=G (default 1)   --logdir=DIR (default ./logs)   --dry-run
#   --coordinator=service|process0 (default service; the same on every node)

# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common.sh
source "$here/../common.sh"

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

nnodes="" node_rank="" master_addr="" master_port=12355 nproc_per_node=1 logdir=logs coordinator=service
while (($#)); do
  opt=$1
  case "$opt" in
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    --*=*) val=${opt#*=}; opt=${opt%%=*}; shift ;;
    --*) (($# >= 2)) || die "$opt needs a value"; val=$2; shift 2 ;;
    *) echo "unknown argument $opt (the command goes after --)" >&2; usage 2 ;;
  esac
  case "$opt" in
    --nnodes) nnodes=$val ;;
    --node_rank) node_rank=$val ;;
    --master_addr) master_addr=$val ;;
    --master_port) master_port=$val ;;
    --nproc_per_node) nproc_per_node=$val ;;
    --logdir) logdir=$val ;;
    --coordinator) coordinator=$val ;;
    *) echo "unknown option $opt" >&2; usage 2 ;;
  esac
done
(($#)) || { echo "no command given after --" >&2; usage 2; }
for v in nnodes node_rank nproc_per_node master_port; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$v must be a non-negative integer, got '${!v}'"
done
[[ -n "$master_addr" ]] || die "--master_addr is required (the host of node_rank 0)"
((nnodes >= 1 && nproc_per_node >= 1)) || die "--nnodes and --nproc_per_node must be >= 1"
((node_rank < nnodes)) || die "--node_rank=$node_rank must be < --nnodes=$nnodes"
[[ "$coordinator" == service || "$coordinator" == process0 ]] ||
  die "--coordinator must be service or process0, got '$coordinator'"

export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Overlap collectives with compute (the FSDP all-gathers, the gradient reduce-scatters).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

nproc=$((nnodes * nproc_per_node))
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$logdir"
echo "launcher: node $node_rank/$nnodes, $nproc_per_node process(es) here, $nproc in all, coordinator $master_addr:$master_port ($coordinator)" >&2
export PBE_JAX_COORDINATOR=process0
if [[ "$coordinator" == service ]]; then
  PBE_JAX_COORDINATOR=external
  if ((node_rank == 0)); then
    start_coordinator "$(python_of "$@")" "[::]:$master_port" "$nproc" "$(heartbeat_of "$@")" "$logdir/coordinator.log"
  fi
fi
pids=()
for ((local_rank = 0; local_rank < nproc_per_node; local_rank++)); do
  pid_id=$((node_rank * nproc_per_node + local_rank))
  argv=("$@" "--coordinator_address=$master_addr:$master_port" "--num_processes=$nproc"
    "--process_id=$pid_id")
  if ((nproc_per_node > 1)); then
    argv=(env "CUDA_VISIBLE_DEVICES=$local_rank" "${argv[@]}")
  fi
  log="$logdir/proc_$pid_id.log"
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${argv[@]}"
    echo "  > $log"
    continue
  fi
  "${argv[@]}" >"$log" 2>&1 &
  pids+=("$!")
done
[[ "$DRY_RUN" == 1 ]] && exit 0

trap_group_signals
first_log="$logdir/proc_$((node_rank * nproc_per_node)).log"
follow_log "$first_log"
status=0
wait_group "${pids[@]}" || status=$?
if [[ -n "$COORD_PID" ]] && ((status != 0 && nnodes > 1)); then
  grace=$(($(heartbeat_of "$@") + 30))
  echo "launcher: keeping the coordinator up for ${grace} s so that the other nodes' processes see the failure" >&2
  sleep "$grace"
fi
stop_coordinator
stop_following
echo "launcher: exit status $status (logs in $logdir)" >&2
exit "$status"
