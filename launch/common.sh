# shellcheck shell=bash
# Helpers sourced by the launchers (local.sh, gpu/*.sh, tpu/pod.sh): dry-run printing and the
# supervision of a group of training processes. Not meant to be run on its own.

# DRY_RUN=1 (or a launcher's --dry-run) prints every command instead of running it.
DRY_RUN="${DRY_RUN:-0}"

# shquote ARG...: the args as one shell-quoted string (single quotes where needed), readable
# and safe to paste or to send as a remote command.
shquote() {
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=" $a"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

# run CMD [ARG...]: run a command, or print it shell-quoted (copy-pasteable) under DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(shquote "$@")"
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# The pids that wait_group supervises, and the signal handler that forwards a stop to them.
GROUP_PIDS=()

_forward_signal() {
  local sig=$1
  echo "launcher: received SIG$sig, forwarding SIGTERM to ${GROUP_PIDS[*]:-nothing}" >&2
  # SIGTERM makes pbe_jax.train write a checkpoint at the current step and exit 0.
  if ((${#GROUP_PIDS[@]})); then
    kill -TERM "${GROUP_PIDS[@]}" 2>/dev/null || true
  fi
}

# follow_log FILE: stream FILE from its start to stdout while the processes run. tail follows it
# until stop_following (its --pid is this launcher, so it never outlives a killed launcher).
# stop_following: once the processes have exited, give tail a moment to print the last lines they
# wrote, then stop it.
follow_log() {
  # The process creates its log when it starts, in the background: it may not exist yet, and
  # tail would give up on a missing file and stream nothing.
  [[ -e "$1" ]] || : >"$1"
  tail -n +1 -f --pid=$$ "$1" &
  FOLLOW_PID=$!
}

stop_following() {
  sleep 1
  kill "$FOLLOW_PID" 2>/dev/null || true
  wait "$FOLLOW_PID" 2>/dev/null || true
}

trap_group_signals() {
  trap '_forward_signal INT' INT
  trap '_forward_signal TERM' TERM
}

# wait_group PID...: wait until every process has exited. As soon as one fails, the others are
# sent SIGTERM (the survivors would otherwise block forever in a collective waiting for the dead
# peer). Returns 0 when all exited 0, else the first non-zero status seen.
wait_group() {
  GROUP_PIDS=("$@")
  local -a left=("$@")
  local status=0 pid rc
  while ((${#left[@]})); do
    local -a still=()
    for pid in "${left[@]}"; do
      # bash reaps finished children and keeps their status for `wait PID`, so kill -0 fails
      # exactly for the processes that are done.
      if kill -0 "$pid" 2>/dev/null; then
        still+=("$pid")
        continue
      fi
      rc=0
      wait "$pid" || rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "launcher: process $pid exited with status $rc; stopping the others" >&2
        local other
        for other in "${left[@]}"; do
          if [[ "$other" != "$pid" ]]; then
            kill -TERM "$other" 2>/dev/null || true
          fi
        done
      elif ((rc != 0)); then
        echo "launcher: process $pid exited with status $rc" >&2
      fi
    done
    left=("${still[@]+"${still[@]}"}")
    if ((${#left[@]})); then
      sleep 1
    fi
  done
  return "$status"
}

# ---- The coordination service in its own process (local.sh, gpu/multinode.sh, gpu/slurm.sbatch) ----
# With the service outside the training processes (PBE_JAX_COORDINATOR=external for them), the
# death of process 0 is one more dead peer: the others exit 75 with the watchdog's message,
# instead of JAX's C++ abort of every process (exit 134) when process 0 hosts the service.

# python_of ARG...: the Python interpreter of a command (its first word that names python,
# e.g. `python`, `.venv/bin/python3.11`), else python3.
python_of() {
  local a
  for a in "$@"; do
    case "${a##*/}" in
      python | python3 | python3.*) echo "$a"; return ;;
    esac
  done
  echo python3
}

# heartbeat_of ARG...: the command's --config.watchdog.heartbeat_seconds (default 100, the
# config's default), which the service must share with the run.
heartbeat_of() {
  local a value=100
  for a in "$@"; do
    case "$a" in
      --config.watchdog.heartbeat_seconds=*) value=${a#*=} ;;
    esac
  done
  echo "$value"
}

COORD_PID=""
# start_coordinator PYTHON ADDRESS NPROC HEARTBEAT LOG: start `python -m pbe_jax.tools.coordinator`
# in the background (its output to LOG) and wait until it serves; a coordinator that cannot
# start (a port in use) stops the launcher with its message. The caller exports
# PBE_JAX_COORDINATOR=external for the processes. Under DRY_RUN it says so on stderr.
start_coordinator() {
  local python=$1 address=$2 nproc=$3 heartbeat=$4 log=$5 i
  local argv=("$python" -m pbe_jax.tools.coordinator "--address=$address" "--num_processes=$nproc"
    "--heartbeat_seconds=$heartbeat")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "launcher: in the background: $(shquote "${argv[@]}") >> $log (the processes get PBE_JAX_COORDINATOR=external)" >&2
    return 0
  fi
  "${argv[@]}" >>"$log" 2>&1 &
  COORD_PID=$!
  for ((i = 0; i < 600; i++)); do
    grep -q "^coordinator: serving" "$log" 2>/dev/null && return 0
    if ! kill -0 "$COORD_PID" 2>/dev/null; then
      tail -n 5 "$log" >&2
      die "the coordinator ($address) did not start; see $log"
    fi
    sleep 0.1
  done
  die "the coordinator ($address) did not report serving within 60 s; see $log"
}

# stop_coordinator: stop the service started by start_coordinator (after the group has exited).
stop_coordinator() {
  [[ -n "$COORD_PID" ]] || return 0
  kill -TERM "$COORD_PID" 2>/dev/null || true
  wait "$COORD_PID" 2>/dev/null || true
  COORD_PID=""
}

# ---- Supervised restarts (local.sh --max_restarts, gpu/slurm.sbatch, tpu/pod.sh supervise) ----

# workdir_of ARG...: the value of --workdir=DIR (or --workdir DIR) among a command's args.
workdir_of() {
  local prev=""
  for a in "$@"; do
    case "$a" in
      --workdir=*) echo "${a#--workdir=}"; return ;;
    esac
    if [[ "$prev" == --workdir ]]; then
      echo "$a"
      return
    fi
    prev=$a
  done
}

# last_logged_step WORKDIR: the step of the last row of WORKDIR/metrics.jsonl (0: none; a
# gs:// workdir is read with gcloud storage when it is installed).
last_logged_step() {
  local f="$1/metrics.jsonl" step=""
  if [[ "$1" == gs://* ]]; then
    step=$(gcloud storage cat "$f" 2>/dev/null | grep -o '"step": *[0-9]*' | tail -n 1 | grep -o '[0-9]*$' || true)
  elif [[ -f "$f" ]]; then
    step=$(grep -o '"step": *[0-9]*' "$f" | tail -n 1 | grep -o '[0-9]*$' || true)
  fi
  echo "${step:-0}"
}

# exit_reason STATUS: what a training process's exit status means.
exit_reason() {
  case "$1" in
    75) echo "a peer process died, vanished or never joined (pbe_jax watchdog)" ;;
    76) echo "no step finished within config.watchdog.stall_minutes (pbe_jax watchdog)" ;;
    134) echo "aborted (SIGABRT; JAX aborts the other processes when process 0 hosts the coordination service and dies)" ;;
    137) echo "killed (SIGKILL: out of memory, or killed by the system)" ;;
    143) echo "terminated (SIGTERM)" ;;
    *) echo "exit status $1" ;;
  esac
}

# now_s: unix time in seconds, with nanoseconds where `date` has %N (GNU), whole seconds otherwise.
now_s() {
  local t
  t=$(date +%s.%N)
  [[ "$t" =~ ^[0-9]+\.[0-9]+$ ]] || t=$(date +%s)
  echo "$t"
}

# record_restart FILE ATTEMPT STATUS STEP FAILED_AT: append one JSON row to FILE (restarts.jsonl):
# when the failure was seen and the restart starts (unix seconds), its exit status and reason,
# and the last logged step.
record_restart() {
  local file=$1 attempt=$2 status=$3 step=$4 failed_at=$5
  [[ -n "$file" ]] || return 0
  printf '{"time": "%s", "failed_at": %s, "restart_at": %s, "attempt": %d, "exit_code": %d, "step": %d, "reason": "%s"}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$failed_at" "$(now_s)" "$attempt" "$status" "$step" \
    "$(exit_reason "$status")" >>"$file" || echo "launcher: cannot write $file" >&2
}

# supervise MAX BACKOFF WORKDIR RECORD CMD...: run CMD (it starts the job, waits for it and
# returns its status); when it fails, run it again up to MAX times (pbe_jax.train resumes from
# the newest checkpoint in WORKDIR), waiting BACKOFF * 2^k seconds before the k-th restart (at
# most 600 s). A failure with the same status at the same last logged step as the one before
# stops the restarts (a deterministic crash would loop). Each restart is a row of RECORD
# (restarts.jsonl; empty: none). Returns the last status.
supervise() {
  local max=$1 backoff=$2 workdir=$3 record=$4
  shift 4
  local attempt=0 status step failed_at prev="" wait_s
  while :; do
    status=0
    "$@" || status=$?
    if ((status == 0)); then
      return 0
    fi
    failed_at=$(now_s)
    step=$(last_logged_step "$workdir")
    if ((attempt >= max)); then
      ((max == 0)) || echo "launcher: $(exit_reason "$status") at step $step; no restarts left ($max used)" >&2
      return "$status"
    fi
    if [[ "$prev" == "$status@$step" ]]; then
      echo "launcher: the run failed the same way twice in a row ($(exit_reason "$status"), last logged step $step): not restarting; a deterministic failure, see the logs" >&2
      return "$status"
    fi
    prev="$status@$step"
    wait_s=$((backoff * (1 << attempt)))
    ((wait_s <= 600)) || wait_s=600
    attempt=$((attempt + 1))
    echo "launcher: $(exit_reason "$status") at step $step; restart $attempt of $max in ${wait_s}s (resumes from the newest checkpoint)" >&2
    sleep "$wait_s"
    record_restart "$record" "$attempt" "$status" "$step" "$failed_at"
  done
}
