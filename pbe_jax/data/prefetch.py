"""Double-buffered input: the next global batches are read, assembled and put on their
sharding by a background thread while the current step runs.

`DevicePrefetch(loader, depth=2)` wraps a `pipeline.Loader` (anything with `__next__`,
`get_state`, `set_state`, `bad_data_counts`, `close`). The thread calls `next(loader)`, which
already places each batch on the mesh (`jax.make_array_from_process_local_data`), so a batch
taken from the queue is on its devices; at most `depth` batches are in flight (the one the
step uses plus `depth - 1` ready). The order of batches is the loader's (one producer).

Checkpoints stay exact: `get_state()` is the loader's position right after the last batch
handed out (recorded by the thread with each batch), not the position of the batches read
ahead. `set_state` must come before the first `next` (the thread starts lazily then).
`wait_seconds()` is the time the consumer spent blocked in `next`: the input stall.
"""
from __future__ import annotations

import queue
import threading
import time

DEPTH = 2
_DONE = object()


class DevicePrefetch:
    def __init__(self, loader, depth: int = DEPTH):
        if depth < 1:
            raise ValueError(f"DevicePrefetch depth must be >= 1, got {depth}")
        self.loader = loader
        self._depth = depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = loader.get_state()
        self._bad = loader.bad_data_counts()
        self._wait = 0.0

    def _start(self) -> None:
        # depth - 1 batches wait in the queue; the thread holds one more while it blocks on put.
        self._queue = queue.Queue(maxsize=max(self._depth - 1, 1))
        self._thread = threading.Thread(target=self._produce, name="pbe_jax-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self.loader)
                except StopIteration:
                    self._put((_DONE, None, None, None))
                    return
                self._put((batch, self.loader.get_state(), self.loader.bad_data_counts(), None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
            self._put((None, None, None, e))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        t = time.perf_counter()
        batch, state, bad, err = self._queue.get()
        self._wait += time.perf_counter() - t
        if err is not None:
            raise err
        if batch is _DONE:
            raise StopIteration
        self._state, self._bad = state, bad
        return batch

    def wait_seconds(self) -> float:
        """Seconds spent blocked in `next` so far (time the step waited for input)."""
        return self._wait

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("DevicePrefetch.set_state after the first batch: the batches read "
                               "ahead would not follow the new position")
        self.loader.set_state(state)
        self._state, self._bad = self.loader.get_state(), self.loader.bad_data_counts()

    def bad_data_counts(self) -> dict[str, int]:
        return dict(self._bad)

    def close(self) -> None:
        """Stop the thread (dropping batches read ahead), then close the loader."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
        self.loader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
