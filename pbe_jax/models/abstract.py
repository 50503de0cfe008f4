"""Shape-only construction of NNX modules (`eval_shape`), without flax 0.12's quadratic cost.

Building a module under `nnx.eval_shape` traces its initialisers. Every `nnx.Rngs` draw updates
the stream's counter through `Variable.set_value`, which compares `getattr(value, 'sharding',
None)` of the traced counter; on a jaxpr tracer that attribute raises an AttributeError whose
message JAX composes by walking the whole trace so far (`find_progenitors`). `getattr` throws
the message away, but composing it makes the build quadratic in the number of parameters: the
sd15 model took 42 CPU-s to build abstractly, 2.6 CPU-s without the message (the demo model
6.6 -> 0.9 CPU-s). `eval_shape` below skips composing that message while it builds.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar

from flax import nnx
from jax._src.interpreters import partial_eval as pe  # the tracer class whose message is costly

T = TypeVar("T")

_lock = threading.Lock()
_depth = 0
_saved = None


@contextlib.contextmanager
def cheap_tracer_errors() -> Iterator[None]:
    """While active, a jaxpr tracer's errors omit the 'this value became a tracer due to...'
    origin (the only part that walks the trace). Error types and the rest of the text are
    unchanged; process-wide (the origin is only ever diagnostic text), re-entrant."""
    global _depth, _saved
    cls = getattr(pe, "DynamicJaxprTracer", None)
    if cls is None or not hasattr(cls, "_origin_msg"):  # another JAX: nothing to work around
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = cls.__dict__.get("_origin_msg")
            cls._origin_msg = lambda self: ""
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                cls._origin_msg = _saved


def eval_shape(make: Callable[[], T]) -> T:
    """`nnx.eval_shape(make)`: the module `make()` builds, with `jax.ShapeDtypeStruct` leaves."""
    with cheap_tracer_errors():
        return nnx.eval_shape(make)
