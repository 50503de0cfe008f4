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
      fi
    done
    left=("${still[@]+"${still[@]}"}")
    if ((${#left[@]})); then
      sleep 1
    fi
  done
  return "$status"
}
