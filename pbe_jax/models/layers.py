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

import functools
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


# A 3x3 convolution over a 3-channel (image) input runs its forward with the input padded to
# this many channels by a zero channel. XLA:CPU's convolution kernel (YNNPACK) is slow at 3 input
# channels: the frozen VAE's conv_in in the `small` train step (3 -> 32, 128x128, batch 8) takes
# 12.6 ms as is and 2.6 ms padded to 4 (PyTorch's oneDNN: 1.0 ms); 3 -> 128 at 128 and 512 px
# runs 1.06-1.13x faster. The zero channel adds exact zeros; the backward pass is the plain
# convolution's (padding it was no faster).
IMAGE_CONV_CHANNELS = 4


def _image_conv(lhs, rhs, window_strides, padding, **kwargs):
    """`lax.conv_general_dilated` (NHWC / HWIO) for a 3-channel input: the forward on the input
    and kernel padded with zero channels to IMAGE_CONV_CHANNELS, the backward unpadded."""
    conv_ = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides,
                              padding=padding, **kwargs)
    extra = IMAGE_CONV_CHANNELS - lhs.shape[-1]
    if extra <= 0:
        return conv_(lhs, rhs)

    @jax.custom_vjp
    def padded(x, w):
        return conv_(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]),
                     jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, extra), (0, 0)]))

    def fwd(x, w):
        return padded(x, w), (x, w)

    def bwd(res, g):
        return jax.vjp(conv_, *res)[1](g)

    padded.defvjp(fwd, bwd)
    return padded(lhs, rhs)


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
        **({"conv_general_dilated": _image_conv} if in_features == 3 and kernel_size == 3 else {}),
    )


class GroupNorm(nnx.Module):
    """`torch.nn.GroupNorm(num_groups, C, eps)` over the channel (last) axis of NHWC input.

    Statistics are fp32 and two-pass (E[(x - mean)^2], as torch). The per-channel sums are
    contractions with a ones vector rather than reductions over (H, W, C/G): XLA:CPU runs
    those strided reductions 2-3x slower than a dot, and on GPU/TPU both forms fuse the same.
    Params `scale`, `bias` [C] as Flax's GroupNorm.
    """

    def __init__(self, num_channels: int, *, num_groups: int, epsilon: float, dtype: Dtype,
                 param_dtype: Dtype):
        self.num_groups, self.epsilon, self.dtype = num_groups, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), out_sharding=(ax.NORM,))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), out_sharding=(ax.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, c, g = x.shape, x.shape[-1], self.num_groups
        xf = x.astype(jnp.float32).reshape(shape[0], -1, c)  # [B, N, C], N = H*W
        n = xf.shape[1] * (c // g)
        ones = jnp.ones((xf.shape[1],), jnp.float32)

        def per_group(v):  # [B, C] per-channel sums -> [B, 1, C] group means, per channel
            m = v.reshape(v.shape[0], g, c // g).sum(-1) / n  # [B, G]
            return jnp.repeat(m, c // g, axis=1)[:, None, :]

        d = xf - per_group(jnp.einsum("bnc,n->bc", xf, ones, precision="highest"))
        var = per_group(jnp.einsum("bnc,bnc->bc", d, d, precision="highest"))
        y = d * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.reshape(shape).astype(self.dtype)


def group_norm(
    num_channels: int,
    rngs: nnx.Rngs,
    *,
    num_groups: int = 32,
    eps: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> GroupNorm:
    """`torch.nn.GroupNorm(num_groups, C, eps)` over the last (channel) axis of NHWC input."""
    del rngs  # deterministic init (scale 1, bias 0)
    if num_channels % num_groups:
        raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    return GroupNorm(num_channels, num_groups=num_groups, epsilon=eps, dtype=dtype,
                     param_dtype=param_dtype)


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
