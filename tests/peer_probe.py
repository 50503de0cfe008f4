"""A multi-process program for the dead-peer tests (`tests/test_pod.py`): the real runtime set-up
(`distributed.initialize_from_flags`), the training watchdog and a cross-process collective per
"step", without a model, so that a test can kill any process (process 0 included) in seconds.

    launch/local.sh -n 2 -d 1 -- python tests/peer_probe.py --die_process=0 --die_at_step=3 \
        --config.watchdog.heartbeat_seconds=5
"""
from __future__ import annotations

import os
import signal
import time

from absl import app, flags

from pbe_jax import distributed

distributed.define_flags()
flags.DEFINE_integer("steps", 10_000, "steps to run (each one all-gather across the processes)")
flags.DEFINE_integer("die_process", -1, "the process that SIGKILLs itself (-1: none)")
flags.DEFINE_integer("die_at_step", 3, "the step at which it does")
# the name the launchers read the run's heartbeat from (launch/common.sh heartbeat_of)
flags.DEFINE_integer("config.watchdog.heartbeat_seconds", 100, "the coordination heartbeat")


def main(argv) -> None:
    del argv
    import numpy as np

    from pbe_jax.training.watchdog import Watchdog

    f = flags.FLAGS
    distributed.initialize_from_flags(heartbeat_seconds=f["config.watchdog.heartbeat_seconds"].value)
    import jax
    from jax.experimental import multihost_utils

    watchdog = Watchdog(stall_seconds=120, peers=True, poll_seconds=0.5)
    watchdog.start()
    me = jax.process_index()
    print(f"probe: process {me} of {jax.process_count()} up", flush=True)
    for step in range(1, f.steps + 1):
        if me == f.die_process and step == f.die_at_step:
            print(f"probe: process {me} kills itself at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            seen = multihost_utils.process_allgather(np.array([me, step]))
        except Exception as e:  # noqa: BLE001 (as training does: name a dead peer, else raise)
            print(f"probe: step {step}: {type(e).__name__}", flush=True)
            watchdog.on_error()
            raise
        assert (seen[:, 1] == step).all(), seen
        watchdog.progress(step)
        print(f"probe: step {step}", flush=True)
        time.sleep(0.2)
    watchdog.stop()


if __name__ == "__main__":
    app.run(main)
