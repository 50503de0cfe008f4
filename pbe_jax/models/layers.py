"""Building blocks shared by every pbe_jax model.

Thin factories over Flax NNX layers that fix the conventions once:
- NHWC activations; kernels laid out as Flax does ([in, out] linear, [kh, kw, in, out] conv).
- fp32 parameters (`param_dtype`), compute in `dtype` (fp32 or bf16).
- PyTorch semantics where they differ from Flax defaults: explicit symmetric conv padding,
  exact (two-pass) variance in norms.
- every parameter carries logical axis names from `pbe_jax.models.axes`.
Leaf names are Flax's (`kernel`, `bias`, `scale`, `embedding`); module paths mirror the PyTorch
attribute paths, so `pbe_jax.convert.torch_layout` maps them with a rename and a transpose.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import axes as ax

Dtype = Any


def linear(
    in_features: int,
    out_features: int,
    rngs: nnx.Rngs,
    *,
    axes: tuple[str | None, str | None] = (ax.EMBED, ax.MLP),
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """`torch.nn.Linear(in, out)`; kernel [in, out] named `axes`, bias named `axes[1]`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"out_sharding": tuple(axes)},
        bias_metadata={"out_sharding": (axes[1],)},
    )


def conv(
    in_features: int,
    out_features: int,
    rngs: nnx.Rngs,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Conv:
    """`torch.nn.Conv2d(in, out, k, stride, padding)` on NHWC; kernel [k, k, in, out]."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=tuple(padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"out_sharding": (None, None, ax.CONV_IN, ax.CONV_OUT)},
        bias_metadata={"out_sharding": (ax.CONV_OUT,)},
    )


def group_norm(
    num_channels: int,
    rngs: nnx.Rngs,
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.GroupNorm:
    """`torch.nn.GroupNorm(num_groups, C, eps)` over the last (channel) axis of NHWC input."""
    if num_channels % num_groups:
        raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,  # torch computes E[(x - mean)^2]; the fast form loses digits
        rngs=rngs,
        scale_metadata={"out_sharding": (ax.NORM,)},
        bias_metadata={"out_sharding": (ax.NORM,)},
    )


def layer_norm(
    num_features: int,
    rngs: nnx.Rngs,
    *,
    eps: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.LayerNorm:
    """`torch.nn.LayerNorm(num_features, eps)`."""
    return nnx.LayerNorm(
        num_features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
        scale_metadata={"out_sharding": (ax.NORM,)},
        bias_metadata={"out_sharding": (ax.NORM,)},
    )


class Identity(nnx.Module):
    """A parameter-free slot (e.g. torch Dropout inside an `nn.Sequential`/`ModuleList`), kept so
    that list indices of the following modules match the PyTorch key names (`ff.net.2`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def activation(name: str):
    """Activation by its diffusers/transformers name."""
    fns = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }
    if name not in fns:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(fns)}")
    return fns[name]


def maybe_remat(fn, enabled: bool, policy: str | None = None):
    """`nnx.remat(fn)` when `enabled` (gradient checkpointing per block), else `fn`.

    `policy` is a name in `jax.checkpoint_policies` (e.g. 'nothing_saveable', 'dots_saveable');
    None recomputes everything in the backward pass.
    """
    if not enabled:
        return fn
    pol = getattr(jax.checkpoint_policies, policy) if policy else None
    return nnx.remat(fn, policy=pol)
