"""SIGTERM handling of the training loop without a host sync per step.

SIGTERM sets a flag; the loop asks `should_stop(step)` after every step and, when it says yes,
saves a checkpoint at that step and exits 0. With one process the flag is read every step (no
collective). With several, the processes must stop at the same step, so they agree on it with
one `process_allgather` of their flags, but only at steps that are a multiple of `every`
(the loop passes `log_every_steps`, steps where it already waits for the device to log): every
process reaches the same step numbers, so all of them join the same collectives, and a SIGTERM
is acted on at most `every` steps after it arrived (the pod's grace period must cover them).
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("pbe_jax")


class Preempted(Exception):
    """A SIGTERM stopped a stage that has no checkpoint of its own (the VAE stage) cleanly; the
    message says what was kept. The command lines log it and exit 0, as after a checkpoint."""


class Preemption:
    def __init__(self, every: int = 1):
        self.every = max(int(every), 1)
        self.requested = False
        self.collectives = 0  # cross-process agreements done
        self.steps = 0  # should_stop calls
        self._prev = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: checkpointing at the next agreed step, then exiting")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step` (the same answer on all of them)."""
        self.steps += 1
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        self.collectives += 1
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def restore(self) -> None:
        """Put the previous SIGTERM handler back; say how often the processes synchronised."""
        signal.signal(signal.SIGTERM, self._prev)
        if jax.process_count() > 1:
            log.info("preemption agreement: %d collectives in %d steps (every %d)",
                     self.collectives, self.steps, self.every)
