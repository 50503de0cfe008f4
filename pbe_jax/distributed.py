"""Multi-process (multi-host) runtime setup shared by every entry point.

`initialize(...)` calls `jax.distributed.initialize` when the run is multi-process:
- explicit `coordinator_address` / `num_processes` / `process_id` (flags of every CLI), or
- auto-detected: Cloud TPU pods and SLURM (`jax.distributed.initialize()` with no arguments
  reads their environment), enabled by `PBE_JAX_DISTRIBUTED=auto` or the `--distributed` flag.
On CPU it selects gloo collectives (cross-process all-reduce on CPU needs them).
It must run before anything touches a jax device. `initialize_from_flags` (what every command
line calls first) also runs `runtime.configure_from_flags` (compilation cache, XLA flags).
"""
from __future__ import annotations

import os

import jax
from absl import flags

from pbe_jax import runtime

_INITIALIZED = False


def define_flags() -> None:
    """The multi-host and runtime flags every CLI accepts."""
    runtime.define_flags()
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
    flags.DEFINE_integer("num_processes", None, "total number of processes")
    flags.DEFINE_integer("process_id", None, "this process's index")
    flags.DEFINE_bool("distributed", False, "auto-detect a multi-host environment (TPU pod, SLURM)")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Returns True when jax.distributed was initialised by this call (or earlier)."""
    global _INITIALIZED
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
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    _INITIALIZED = True
    return True


def initialize_from_flags() -> bool:
    """The start of every command line: runtime set-up, then multi-host initialisation."""
    runtime.configure_from_flags()
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
