"""No hang on a dead peer: a step watchdog for multi-process runs.

A thread, independent of the collectives (which may never return when a peer is gone: NCCL and
TPU ICI wait forever, gloo errors out), checks every few seconds that
- every process is still live at the JAX coordination service (`distributed.missing_processes`;
  a SIGKILLed or crashed process drops out at once, a hung one after
  `config.watchdog.heartbeat_seconds`), and
- this process finished a step within `config.watchdog.stall_minutes` (from the first step on;
  compilation is not counted; each eval / sample / checkpoint section between two steps must
  fit in it too).
When either fails it writes one message naming the step, the last progress time and the missing
process(es), dumps every Python thread's stack (faulthandler) to stderr, flushes the logs and
exits with EXIT_PEER_LOST (75) or EXIT_STALLED (76): a clean non-zero exit the launchers
restart from (`launch/common.sh`), never a hang.

A dead process 0 is such a peer too when the coordination service runs in its own process
(`PBE_JAX_COORDINATOR=external`, what the launchers in `launch/` do: `pbe_jax.tools.coordinator`).
When process 0 hosts the service (JAX's default) and dies, JAX's C++ client ends the others at
once (exit 134, SIGABRT, with this module's faulthandler stack dump); the launchers name that exit.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

import jax

from pbe_jax import distributed

log = logging.getLogger("pbe_jax")

EXIT_PEER_LOST = distributed.EXIT_PEER_LOST  # 75, EX_TEMPFAIL: a peer is gone; restart the job
EXIT_STALLED = 76  # no step finished within the bound


def _flush_logs() -> None:
    for logger in (log, logging.getLogger()):
        for h in logger.handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001 (a closed stream must not stop the exit)
                pass
    sys.stdout.flush()
    sys.stderr.flush()


DEFAULT_STALL_MINUTES = 15.0



def stall_minutes(config) -> float:
    """`config.watchdog.stall_minutes` (a config file without the block gets the default)."""
    return float((config.get("watchdog") or {}).get("stall_minutes", DEFAULT_STALL_MINUTES))


def heartbeat_seconds(config) -> int:
    """`config.watchdog.heartbeat_seconds` (a config file without the block: the default)."""
    return int((config.get("watchdog") or {}).get("heartbeat_seconds", distributed.DEFAULT_HEARTBEAT_SECONDS))


class Watchdog:
    """`progress(step)` after every step; `stop()` when the run ends normally.

    stall_seconds: the bound on the time between two steps (0: no stall check); peers: check
    the other processes' liveness (multi-process runs); poll_seconds: how often the thread looks.
    """

    def __init__(self, stall_seconds: float, peers: bool, poll_seconds: float | None = None):
        self.stall_seconds = float(stall_seconds)
        self.peers = peers
        self.poll_seconds = poll_seconds or min(max(self.stall_seconds / 10, 0.5), 5.0)
        self.step: int | None = None  # the last finished step (None: before the first)
        self.last_wall = time.time()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._dying = threading.Lock()  # one message and one exit, whichever thread sees it first
        self._thread = threading.Thread(target=self._run, name="pbe_jax-watchdog", daemon=True)

    @classmethod
    def for_config(cls, config) -> "Watchdog":
        """The run's watchdog from `config.watchdog`, started; SIGABRT / SIGSEGV also dump the
        Python stacks (faulthandler)."""
        faulthandler.enable(file=sys.stderr, all_threads=True)
        multi = jax.process_count() > 1  # one process has no peer to wait for: no thread
        wd = cls(60.0 * stall_minutes(config) if multi else 0.0, peers=multi)
        wd.start()
        return wd

    def start(self) -> None:
        if self.peers or self.stall_seconds > 0:
            self._thread.start()

    def progress(self, step: int) -> None:
        self.step, self.last_wall, self._last = step, time.time(), time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def on_error(self) -> None:
        """The run raised: name a missing peer if there is one (and exit); else a single
        process stops watching (the error propagates), while a multi-process one keeps
        guarding the way out (a collective in the clean-up that never returns)."""
        self.check_peers()
        if not self.peers:
            self.stop()

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.last_wall))
        ago = time.time() - self.last_wall
        if self.step is None:
            return f"before the first step (started {when}, {ago:.0f} s ago)"
        return f"at step {self.step} (its end at {when}, {ago:.0f} s ago)"

    def check_peers(self) -> None:
        """Exit EXIT_PEER_LOST now when a process is gone (also for the loop's error path:
        a collective that failed because a peer died reports the peer, not the symptom)."""
        if not self.peers:
            return
        missing, why = distributed.missing_processes()
        # stop() may come while the query runs (the run ended; a peer past the exit barrier
        # has disconnected): the exit barrier's timeout bounds the way out, not the watchdog
        if missing and not self._stop.is_set():
            self.die(EXIT_PEER_LOST, f"process(es) {missing} of {jax.process_count()} gone ({why})")

    def die(self, code: int, what: str) -> None:
        if not self._dying.acquire(blocking=False):
            threading.Event().wait()  # the other thread is writing the message and exiting
        msg = (f"watchdog: {what}; process {jax.process_index()} stops {self.describe()} with "
               f"exit code {code} (Python stacks follow). Restart the job (launch/local.sh "
               f"--max_restarts, SLURM requeue, launch/tpu/pod.sh): it resumes from the newest checkpoint.")
        log.error("%s", msg)
        _flush_logs()
        print(msg, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        _flush_logs()
        os._exit(code)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check_peers()
            idle = time.monotonic() - self._last
            if self.stall_seconds > 0 and self.step is not None and idle > self.stall_seconds:
                self.die(EXIT_STALLED, f"no step finished for {idle:.0f} s (bound "
                         f"config.watchdog.stall_minutes = {self.stall_seconds / 60:g}): a peer "
                         "or a collective hangs")
