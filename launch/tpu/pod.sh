#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for pbe_jax: create (queued resource), install on every worker,
# run a config on all workers, stream logs, stop, delete. Every step is one documented gcloud
# command; `--dry-run` (or DRY_RUN=1) prints them instead of running them.
#
#   export TPU_NAME=pbe-v5p-64 ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-64
#   launch/tpu/pod.sh create                 # queued resource, waits until ACTIVE
#   launch/tpu/pod.sh setup                  # this checkout + pbe_jax[tpu] on all workers
#   launch/tpu/pod.sh run -- python -m pbe_jax.train --config=configs/pbe.py:sd15 \
#       --workdir=gs://BUCKET/pbe_sd15       # detached on all workers (--wait: until it ends)
#   launch/tpu/pod.sh logs [WORKER]          # stream a worker's log (default 0)
#   launch/tpu/pod.sh stop                   # SIGTERM: checkpoint at the current step, exit
#   launch/tpu/pod.sh delete                 # delete the queued resource and its TPU VMs
#
# Other subcommands: `status` (queued-resource state), `wait` (until the run ends, exit with its
# status), `ssh -- CMD...` (any command on all workers), and
#   launch/tpu/pod.sh supervise --max_restarts=N -- python -m pbe_jax.train ... --workdir=gs://...
# which runs the command (`run --wait`) and, when it fails or the slice is preempted, restarts
# it up to N times with backoff: a queued resource that is no longer ACTIVE (spot preemption,
# maintenance) is deleted, created again, set up again, then the run relaunched; it resumes from
# the newest checkpoint. The same failure at the same step twice in a row stops (see
# launch/common.sh `supervise`); each restart is a row of WORKDIR/restarts.jsonl (local
# workdirs) and of ./restarts.jsonl here.
#
# Environment:
#   TPU_NAME, ZONE        required
#   PROJECT               default: gcloud's configured project
#   ACCELERATOR_TYPE      default v5p-8 (v4-N, v5p-N, v5litepod-N, v6e-N)
#   RUNTIME_VERSION       default from the accelerator type (v2-alpha-tpuv5, ...)
#   QR_ID                 queued-resource id, default "$TPU_NAME-qr"
#   SPOT=1 | RESERVED=1   capacity type of the queued resource (default on-demand)
#   PYTHON_VERSION        Python of the workers' venv, default 3.11 (installed with uv)
#   POLL_SECONDS          how often (whole seconds) `wait` / `supervise` poll the run's end, default
#                         10; the queued resource's state while it is created: 3x that
#   PBE_JAX_SOURCE        pip requirement to install instead of this checkout's tarball, e.g.
#                         "pbe_jax[tpu] @ git+https://github.com/ORG/pbe_jax"
#
# On the workers the run starts in ~/pbe_jax (this checkout, so configs/ is there) with
# PBE_JAX_DISTRIBUTED=auto: jax.distributed.initialize() reads the pod's topology itself. Use a
# gs:// workdir: orbax writes checkpoints there from all workers; logs and metrics come from
# process 0. The VMs' service account needs write access to the bucket.

# shellcheck source-path=SCRIPTDIR
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../common.sh
source "$here/../common.sh"

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

# How often the queued resource's state and the run's end are polled (seconds).
POLL_SECONDS="${POLL_SECONDS:-10}"
# Files on every worker; $HOME expands there, inside the remote commands.
# shellcheck disable=SC2016
REMOTE_DIR='$HOME/pbe_jax' REMOTE_VENV='$HOME/pbe_venv' REMOTE_LOG='$HOME/pbe_jax_run.log' \
  REMOTE_PID='$HOME/pbe_jax_run.pid' REMOTE_RC='$HOME/pbe_jax_run.rc'

default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

load_env() {
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM / pod slice name)"
  [[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-east5-a for v5p)"
  ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"
  QR_ID="${QR_ID:-$TPU_NAME-qr}"
  PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
  where=("--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    where+=("--project=$PROJECT")
  fi
}

tpu_ssh() { # tpu_ssh WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" "--worker=$1" "--command=$2"
}

qr_state() {
  gcloud compute tpus queued-resources describe "$QR_ID" "${where[@]}" --format='value(state.state)'
}

cmd_create() {
  local -a capacity=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    capacity=(--spot)
  elif [[ "${RESERVED:-0}" == 1 ]]; then
    capacity=(--reserved)
  fi
  run gcloud compute tpus queued-resources create "$QR_ID" "${where[@]}" \
    "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--runtime-version=$RUNTIME_VERSION" "${capacity[@]+"${capacity[@]}"}"
  [[ "$DRY_RUN" == 1 ]] && return 0
  local state=""
  while :; do
    state="$(qr_state)"
    echo "queued resource $QR_ID: $state"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $QR_ID is $state (see: gcloud compute tpus queued-resources describe $QR_ID)" ;;
    esac
    sleep "$((POLL_SECONDS * 3))"
  done
}

cmd_setup() {
  local install
  if [[ -n "${PBE_JAX_SOURCE:-}" ]]; then
    install="uv pip install --python $REMOTE_VENV/bin/python $(shquote "$PBE_JAX_SOURCE")"
  else
    # Ship this checkout (configs/ and launch/ included) and install it editable.
    local tarball="${TMPDIR:-/tmp}/pbe_jax_src.tgz"
    run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude=.venv --exclude=docs/_build .
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:pbe_jax_src.tgz" "${where[@]}" --worker=all
    install="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf \$HOME/pbe_jax_src.tgz -C $REMOTE_DIR"
    install+=" && uv pip install --python $REMOTE_VENV/bin/python -e \"${REMOTE_DIR}[tpu]\""
  fi
  # uv brings its own Python (the TPU VM images ship 3.10; pbe_jax needs >= 3.11).
  tpu_ssh all "set -e; curl -LsSf https://astral.sh/uv/install.sh | sh; export PATH=\$HOME/.local/bin:\$PATH; \
uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV; $install; \
$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
}

cmd_run() {
  local wait_for_end=0
  while (($#)); do
    case "$1" in
      --wait) wait_for_end=1; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  (($#)) || die "run: give the command after --, e.g. run -- python -m pbe_jax.train --config=... --workdir=gs://..."
  local inner
  # The wrapper records the program's own pid (what `stop` signals: pbe_jax.train checkpoints
  # on SIGTERM) and, once it ends, its exit status (what `wait` reports). nohup: the run
  # survives the ssh session.
  inner="$(shquote "$@") & echo \$! > $REMOTE_PID; wait \$!; echo \$? > $REMOTE_RC"
  tpu_ssh all "mkdir -p $REMOTE_DIR && cd $REMOTE_DIR && source $REMOTE_VENV/bin/activate && export PBE_JAX_DISTRIBUTED=auto \
&& rm -f $REMOTE_RC $REMOTE_PID && (nohup bash -c $(shquote "$inner") > $REMOTE_LOG 2>&1 &) \
&& for _ in \$(seq 100); do [ -s $REMOTE_PID ] && break; sleep 0.1; done; \
echo started on \$(hostname): pid \$(cat $REMOTE_PID)"
  if ((wait_for_end)); then
    cmd_wait
  else
    echo "follow the run with: $0 logs    stop it (checkpoint first) with: $0 stop"
  fi
}

cmd_wait() {
  # Stream worker 0's log until its process ends, then wait for every worker; the exit status
  # is the run's (non-zero when any worker's run failed).
  tpu_ssh 0 "tail -n +1 -f --pid=\$(cat $REMOTE_PID) $REMOTE_LOG" || true
  tpu_ssh all "while [ ! -s $REMOTE_RC ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; do sleep $POLL_SECONDS; done; \
for _ in \$(seq 20); do [ -s $REMOTE_RC ] && break; sleep 0.5; done; exit \$(cat $REMOTE_RC 2>/dev/null || echo 1)"
}

# One try of `supervise`: on a restart, a slice that is not ACTIVE any more is recreated and
# set up again first; then the run, waited for.
SUPERVISE_TRIES=0
# shellcheck disable=SC2329 # called by supervise
supervised_try() {
  if ((SUPERVISE_TRIES > 0)); then
    local state
    state="$(qr_state 2>/dev/null || echo MISSING)"
    if [[ "$state" != ACTIVE ]]; then
      echo "pod: queued resource $QR_ID is ${state:-MISSING}: recreating it" >&2
      cmd_delete || true
      cmd_create
      cmd_setup
    fi
  fi
  SUPERVISE_TRIES=$((SUPERVISE_TRIES + 1))
  cmd_run --wait -- "$@"
}

cmd_supervise() {
  local max=0 backoff=60
  while (($#)); do
    case "$1" in
      --max_restarts=*) max=${1#*=}; shift ;;
      --restart_backoff=*) backoff=${1#*=}; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  (($#)) || die "supervise: give the command after --"
  [[ "$max" =~ ^[0-9]+$ ]] || die "--max_restarts must be a count >= 0, got '$max'"
  [[ "$backoff" =~ ^[0-9]+$ ]] || die "--restart_backoff must be whole seconds, got '$backoff'"
  local workdir record="restarts.jsonl"
  workdir="$(workdir_of "$@")"
  [[ -n "$workdir" ]] || die "supervise: the command needs --workdir (the run resumes from its checkpoints)"
  [[ "$workdir" == *://* ]] || record="$workdir/restarts.jsonl"
  if [[ "$DRY_RUN" == 1 ]]; then
    supervised_try "$@"
    return 0
  fi
  supervise "$max" "$backoff" "$workdir" "$record" supervised_try "$@"
}

cmd_logs() {
  tpu_ssh "${1:-0}" "tail -n +1 -F $REMOTE_LOG"
}

cmd_stop() {
  # pbe_jax.train checkpoints at the current step on SIGTERM, then exits 0.
  tpu_ssh all "kill -TERM \$(cat $REMOTE_PID) 2>/dev/null && echo stopping on \$(hostname) || echo no run on \$(hostname)"
}

cmd_delete() {
  # --force deletes the TPU VMs that the queued resource created as well.
  run gcloud compute tpus queued-resources delete "$QR_ID" "${where[@]}" --force --quiet
}

cmd_status() {
  run gcloud compute tpus queued-resources describe "$QR_ID" "${where[@]}"
}

cmd_ssh() {
  [[ "${1:-}" == -- ]] && shift
  (($#)) || die "ssh: give the command after --"
  tpu_ssh all "$(shquote "$@")"
}

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    *) break ;;
  esac
done
(($#)) || usage 2
sub=$1
shift
load_env
case "$sub" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run "$@" ;;
  wait) cmd_wait ;;
  logs) cmd_logs "$@" ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  status) cmd_status ;;
  ssh) cmd_ssh "$@" ;;
  supervise) cmd_supervise "$@" ;;
  *) echo "unknown subcommand '$sub'" >&2; usage 2 ;;
esac
