"""The coordination service of a multi-process run, in its own process:
`python -m pbe_jax.tools.coordinator --address=[::]:12355 --num_processes=N`.

The launchers in `launch/` start it beside the training processes and set
`PBE_JAX_COORDINATOR=external` for them, so that no training process hosts the service. Then the
death of any process, process 0 included, is a dead peer: the survivors' watchdog
(`pbe_jax.training.watchdog`) exits 75 with a message naming it, where a service inside process
0 takes every other process down with it (JAX's C++ abort, exit 134). See `distributed.serve`.

It serves until SIGTERM (or Ctrl-C when started by hand), or until the process that started it is gone (a launcher
killed with SIGKILL leaves no coordinator behind). `--heartbeat_seconds` must match the runs'
`config.watchdog.heartbeat_seconds` (how long a silent process may be before it counts as dead).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from absl import app, flags

from pbe_jax import distributed

flags.DEFINE_string("address", None, "bind address of the service, host:port: [::]:PORT (every "
                    "interface) or 127.0.0.1:PORT; the runs' --coordinator_address names this port")
flags.DEFINE_integer("num_processes", None, "the processes of the run")
flags.DEFINE_integer("heartbeat_seconds", distributed.DEFAULT_HEARTBEAT_SECONDS,
                     "a process silent for this long counts as dead (the runs' "
                     "config.watchdog.heartbeat_seconds)")
flags.DEFINE_bool("exit_with_parent", True, "stop when the process that started this one exits")
flags.mark_flags_as_required(["address", "num_processes"])


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.num_processes < 1 or f.heartbeat_seconds < 1:
        sys.exit(f"--num_processes and --heartbeat_seconds must be >= 1, got {f.num_processes} "
                 f"and {f.heartbeat_seconds}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # A launcher's background job ignores SIGINT (a Ctrl-C reaches the training processes,
    # which checkpoint through this service: it must outlive them); by hand, Ctrl-C stops it.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = os.getppid()
    try:
        service = distributed.serve(f.address, f.num_processes, f.heartbeat_seconds)
    except Exception as e:  # noqa: BLE001 (a port in use, a bad address: say which)
        sys.exit(f"coordinator: cannot serve on {f.address}: {str(e).splitlines()[0]}")
    print(f"coordinator: serving {f.num_processes} processes on {f.address} (heartbeat "
          f"{f.heartbeat_seconds} s, pid {os.getpid()})", flush=True)
    while not stop.wait(1.0):
        if f.exit_with_parent and os.getppid() != parent:
            print(f"coordinator: the process that started me ({parent}) is gone; stopping", flush=True)
            break
    print("coordinator: stopping", flush=True)
    service.shutdown()


if __name__ == "__main__":
    app.run(main)
