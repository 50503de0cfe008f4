"""Multi-process (multi-host) runtime setup shared by every entry point.

`initialize(...)` calls `jax.distributed.initialize` when the run is multi-process:
- explicit `coordinator_address` / `num_processes` / `process_id` (flags of every CLI), or
- auto-detected: Cloud TPU pods and SLURM (`jax.distributed.initialize()` with no arguments
  reads their environment), enabled by `PBE_JAX_DISTRIBUTED=auto` or the `--distributed` flag.
On CPU it selects gloo collectives (cross-process all-reduce on CPU needs them).
Multi-process runs enable JAX's recoverability (`jax_enable_recoverability`): when a process
dies, the coordination service no longer aborts every other process in C++ (exit 134, "another
task died"); it marks the task dead (`missing_processes`) and the training watchdog
(`pbe_jax.training.watchdog`) stops the survivors with a message naming it. `heartbeat_seconds`:
how long a task may stay silent (hung, not dead) before the service marks it dead. The end of a
run then needs its own barrier (`_barrier_at_exit`): without it process 0 could take the
service down while the others still finish.
It must run before anything touches a jax device. `initialize_from_flags` (what every command
line calls first) also runs `runtime.configure_from_flags` (compilation cache, XLA flags).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time

import jax
from absl import flags
from jax._src import distributed as jax_distributed

from pbe_jax import runtime

_INITIALIZED = False
_EXTERNAL = False  # this run's coordination service runs in its own process (not process 0)
DEFAULT_HEARTBEAT_SECONDS = 100  # jax.distributed.initialize's default
DEFAULT_JOIN_TIMEOUT_SECONDS = 300  # jax.distributed.initialize's initialization_timeout default
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a peer is gone or never joined; restart the job
COORDINATOR_ENV = "PBE_JAX_COORDINATOR"  # "external": the service is `python -m pbe_jax.tools.coordinator`
log = logging.getLogger("pbe_jax")


def define_flags() -> None:
    """The multi-host and runtime flags every CLI accepts."""
    runtime.define_flags()
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
    flags.DEFINE_integer("num_processes", None, "total number of processes")
    flags.DEFINE_integer("process_id", None, "this process's index")
    flags.DEFINE_bool("distributed", False, "auto-detect a multi-host environment (TPU pod, SLURM)")
    flags.DEFINE_integer("join_timeout_seconds", DEFAULT_JOIN_TIMEOUT_SECONDS,
                         "multi-process runs: how long the processes wait for each other (and for "
                         "the coordination service) at start before exiting 75 with a message")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
               join_timeout_seconds: int = DEFAULT_JOIN_TIMEOUT_SECONDS) -> bool:
    """Returns True when jax.distributed was initialised by this call (or earlier).

    When not every process has joined within `join_timeout_seconds` (a process that never
    started, a wrong --num_processes or --process_id, an unreachable coordinator), this process
    exits EXIT_PEER_LOST with a message saying what to check, before JAX's own timeout would
    abort it in C++."""
    global _INITIALIZED, _EXTERNAL
    if _INITIALIZED:
        return True
    platforms = os.environ.get("JAX_PLATFORMS", "")
    explicit = coordinator_address is not None
    auto = auto or os.environ.get("PBE_JAX_DISTRIBUTED", "") == "auto"
    if not (explicit or auto):
        return False
    if "cpu" in platforms or (explicit and not platforms):
        # Harmless on GPU/TPU (only affects the CPU backend); required for CPU all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    kw = {"heartbeat_timeout_seconds": int(heartbeat_seconds)}
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        kw.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    external = external_service()
    kw["initialization_timeout"] = int(join_timeout_seconds) + 60  # ours fires first
    where = (f"the coordination service at {coordinator_address}" if explicit else
             "the auto-detected coordination service (process 0's host)")
    if external:
        where += " (an external `python -m pbe_jax.tools.coordinator`: PBE_JAX_COORDINATOR=external)"
    guard = threading.Timer(join_timeout_seconds, _not_joined, args=(
        join_timeout_seconds, where, process_id, num_processes))
    guard.daemon = True
    guard.start()
    try:
        (_initialize_client_only if external else jax.distributed.initialize)(**kw)
    finally:
        guard.cancel()
    _INITIALIZED, _EXTERNAL = True, external
    atexit.register(_barrier_at_exit, int(heartbeat_seconds))  # runs before jax's own shutdown
    return True


def _not_joined(timeout_s: int, where: str, process_id, num_processes) -> None:
    who = "this process" if process_id is None else f"process {process_id}"
    n = "all" if num_processes is None else f"all {num_processes}"
    msg = (f"distributed: the run did not start within --join_timeout_seconds={timeout_s}: "
           f"{who} is waiting for {n} processes to join {where}. A process that was never "
           "started or died at start, processes given different --num_processes or the same "
           "--process_id, a coordinator that is not running or not reachable from this host "
           f"(firewall, wrong host or port). Exit code {EXIT_PEER_LOST}.")
    log.error("%s", msg)
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def external_service() -> bool:
    """True when `PBE_JAX_COORDINATOR=external` (a separate coordinator process hosts the
    service); unset or "process0": process 0 hosts it, JAX's default."""
    value = os.environ.get(COORDINATOR_ENV, "")
    if value not in ("", "process0", "external"):
        raise ValueError(f"{COORDINATOR_ENV}={value!r}: expected 'external' (a separate "
                         "`python -m pbe_jax.tools.coordinator` hosts the coordination service) or "
                         "'process0' (the default: process 0 hosts it)")
    return value == "external"


class _ClientOnly:
    """jaxlib's `_jax` module as jax.distributed sees it, except that it starts no service:
    process 0 connects to the external coordinator as every other process does."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def get_distributed_runtime_service(*args, **kwargs):
        return None


def _initialize_client_only(**kw) -> None:
    real = jax_distributed._jax
    jax_distributed._jax = _ClientOnly(real)
    try:
        jax.distributed.initialize(**kw)
    finally:
        jax_distributed._jax = real


def serve(address: str, num_processes: int, heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
          shutdown_seconds: int = 300):
    """Start the coordination service for `num_processes` clients on `address` (a bind
    address such as `[::]:12355` or `127.0.0.1:12355`) in this process, recoverable (a dead
    task is marked dead, the others live on); returns it (keep a reference: it stops when
    collected or `.shutdown()`). What `python -m pbe_jax.tools.coordinator` runs."""
    from jax._src.lib import _jax
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    return _jax.get_distributed_runtime_service(
        address, int(num_processes), heartbeat_timeout=int(heartbeat_seconds),
        shutdown_timeout=int(shutdown_seconds), recoverable=True)


def _client():
    return jax_distributed.global_state.client


def missing_processes() -> tuple[list[int], str]:
    """([process ids the coordination service does not count live], why); ([], '') when all
    are, or the run is single-process. A coordinator that cannot be reached counts process 0."""
    n = jax.process_count()
    client = _client()
    if n == 1 or client is None:
        return [], ""
    try:
        live = client.get_live_nodes(list(range(n)))
    except Exception as e:  # noqa: BLE001 (any RPC failure means the coordinator is gone)
        return [0], f"the coordinator, process 0, cannot be reached: {str(e).splitlines()[0][:200]}"
    missing = sorted(set(range(n)) - set(live))
    return missing, "not live at the coordination service: exited, killed or silent past the heartbeat" \
        if missing else ""


def _barrier_at_exit(timeout_s: int) -> None:
    """Every process waits for the others at exit (recoverable mode drops JAX's own shutdown
    barrier); a process that is gone makes this return after `timeout_s`, not hang."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    n = jax.process_count()
    try:
        client.wait_at_barrier("pbe_jax_exit", timeout_in_ms=int(timeout_s) * 1000)
        if _EXTERNAL or jax.process_index() != 0:
            jax.distributed.shutdown()  # disconnect while the service (process 0's or the external one) still runs
            return
        deadline = time.monotonic() + timeout_s  # process 0 stops the service last
        while len(client.get_live_nodes(list(range(n)))) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001
        log.warning("exit barrier: %s", str(e).splitlines()[0][:200])


def initialize_from_flags(heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS) -> bool:
    """The start of every command line: runtime set-up, then multi-host initialisation."""
    runtime.configure_from_flags()
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed,
                      heartbeat_seconds=heartbeat_seconds, join_timeout_seconds=f.join_timeout_seconds)
