"""Input prefetch (pbe_jax.data.prefetch) and the SIGTERM agreement (training.preemption)."""
import threading
import time

import numpy as np
import pytest

from pbe_jax.data.prefetch import DevicePrefetch
from pbe_jax.training import preemption


class _Counter:
    """A loader stand-in: batch i is {'x': i}; its state is the index of the next batch."""

    def __init__(self, n, fail_at=None, delay=0.0):
        self.i, self.n, self.fail_at, self.delay = 0, n, fail_at, delay
        self.closed = False

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad record {self.i}")
        if self.i >= self.n:
            raise StopIteration
        time.sleep(self.delay)
        self.i += 1
        return {"x": np.array(self.i - 1)}

    def get_state(self):
        return {"next": self.i}

    def set_state(self, state):
        self.i = state["next"]

    def bad_data_counts(self):
        return {"decode": self.i}

    def close(self):
        self.closed = True


def test_same_batches_in_order_and_state_of_the_consumed_batch():
    loader = _Counter(6)
    it = DevicePrefetch(loader, depth=3)
    it.set_state({"next": 1})
    got = []
    for b in it:
        got.append(int(b["x"]))
        # the loader has read ahead; the state is where a resume continues after this batch
        assert it.get_state() == {"next": got[-1] + 1}
        assert it.bad_data_counts() == {"decode": got[-1] + 1}
    assert got == [1, 2, 3, 4, 5]
    it.close()
    assert loader.closed


def test_reads_ahead_at_most_depth_batches():
    loader = _Counter(100)
    it = DevicePrefetch(loader, depth=2)
    next(it)
    time.sleep(0.3)
    assert loader.i == 3  # the batch handed out, one ready in the queue, one held by the thread
    it.close()
    assert not any(t.name == "pbe_jax-prefetch" and t.is_alive() for t in threading.enumerate())


def test_loader_errors_reach_the_consumer():
    it = DevicePrefetch(_Counter(10, fail_at=2))
    assert [int(next(it)["x"]) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="bad record 2"):
        next(it)
    it.close()


def test_wait_seconds_measures_the_stall():
    it = DevicePrefetch(_Counter(3, delay=0.2), depth=2)
    next(it)
    assert it.wait_seconds() >= 0.15
    it.close()


def test_set_state_after_reading_is_refused():
    it = DevicePrefetch(_Counter(3))
    next(it)
    with pytest.raises(RuntimeError, match="set_state"):
        it.set_state({"next": 0})
    it.close()


def test_preemption_agrees_only_every_n_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption.multihost_utils, "process_allgather",
                        lambda x: calls.append(bool(x)) or np.array([bool(x), False]))
    pre = preemption.Preemption(every=5)
    try:
        assert not any(pre.should_stop(s) for s in range(1, 13))
        assert len(calls) == 2 and pre.collectives == 2  # steps 5 and 10 only
        pre.requested = True  # SIGTERM on this process: acted on at the next agreed step
        assert [pre.should_stop(s) for s in range(13, 16)] == [False, False, True]
        assert calls[-1] is True and len(calls) == 3
    finally:
        pre.restore()
