"""Run a frozen feature network over image batches: jit-compiled once, batch-sharded over a mesh.

The metrics (FID, QS, CLIP score) all need the same loop: host batches of images in, a feature
vector per image out, on the host, for float64 statistics. `FeatureExtractor` holds the jitted
forward; `iterate_features` drives it over an iterable with a tqdm bar.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm


class FeatureExtractor:
    """`fn(model, batch) -> features` jit-compiled over a frozen NNX `model`; numpy in and out.

    - With a `mesh`, params are replicated and the batch is split over `batch_axes` (default:
      every mesh axis, since nothing here is model-parallel).
    - Batches are padded (by repeating the last image) to a multiple of the number of batch
      shards, and up to `batch_size` when given, so a short last batch reuses the compiled
      program instead of compiling a new one; the padding is cut from the result.
    - `precision` is the matmul/conv precision while tracing `fn` ('highest' = true fp32 on
      TPU/GPU, whose default rounds fp32 inputs to bf16): metric numbers should not depend on
      the accelerator.
    Single-process: every batch is a full (global) batch held by this process.
    """

    def __init__(
        self,
        model: nnx.Module,
        fn: Callable[[Any, jax.Array], Any],
        *,
        mesh: Mesh | None = None,
        batch_axes: Sequence[str] | None = None,
        batch_size: int | None = None,
        precision: str | None = "highest",
    ):
        graphdef, state = nnx.split(model)
        self.batch_size = batch_size
        self.num_shards = 1
        jit_kw = {}
        if mesh is not None:
            axes = tuple(batch_axes) if batch_axes is not None else tuple(mesh.axis_names)
            unknown = [a for a in axes if a not in mesh.axis_names]
            if unknown:
                raise ValueError(f"batch axes {unknown} are not mesh axes {mesh.axis_names}")
            self.num_shards = math.prod(mesh.shape[a] for a in axes)
            replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(axes))
            state = jax.device_put(state, replicated)
            jit_kw = dict(in_shardings=(replicated, batch), out_shardings=batch)
        self._state = state

        def run(state, x):
            if precision is None:
                return fn(nnx.merge(graphdef, state), x)
            with jax.default_matmul_precision(precision):
                return fn(nnx.merge(graphdef, state), x)

        self._run = jax.jit(run, **jit_kw)

    def padded_size(self, n: int) -> int:
        target = max(n, self.batch_size or 0)
        return -(-target // self.num_shards) * self.num_shards

    def __call__(self, batch: np.ndarray):
        """`batch` `[N, ...]` (host array) -> `fn`'s output for the N items, as numpy."""
        batch = np.asarray(batch)
        n = batch.shape[0]
        if n == 0:
            raise ValueError("FeatureExtractor got an empty batch")
        padded = self.padded_size(n)
        if padded != n:
            batch = np.concatenate([batch, np.repeat(batch[-1:], padded - n, axis=0)])
        out = self._run(self._state, batch)
        return jax.tree.map(lambda a: np.asarray(jax.device_get(a))[:n], out)


def iterate_features(
    extract: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[np.ndarray],
    *,
    total: int | None = None,
    desc: str = "features",
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Yield `extract(batch)` for each batch, with a tqdm bar (`total` = number of batches)."""
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        yield extract(batch)
