"""pbe_jax: Paint by Example (Yang et al., CVPR 2023) in JAX / Flax NNX.

Params are created without eager sharding: pbe_jax places every array itself (abstract init with
`nnx.eval_shape`, then `jax.jit(..., out_shardings=...)` or `jax.device_put` per leaf) using the
logical axis names attached to each parameter, see `pbe_jax.models.axes`.
"""
from flax import nnx as _nnx

from pbe_jax import logs as _logs

_nnx.use_eager_sharding(False)
_logs.install()  # orbax / JAX lines that need no action stay out of the way (back with -v 1)

__version__ = "0.1.0"
__all__ = ["PaintByExample"]  # the public API (docs/api); the rest lives in the subpackages


def __getattr__(name):
    # Lazy so that `import pbe_jax.models` does not pull in the pipeline (and its deps).
    if name == "PaintByExample":
        from pbe_jax.pipeline import PaintByExample

        return PaintByExample
    raise AttributeError(name)
