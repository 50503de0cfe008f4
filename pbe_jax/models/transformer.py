"""diffusers' `Attention`, `FeedForward` and `BasicTransformerBlock` in Flax NNX.

Shared by the UNet (`Transformer2DModel.transformer_blocks`: self-attention, cross-attention to
the context, GEGLU feed-forward) and the Paint-by-Example mapper (self-attention only, GELU,
biased attention projections). Module paths equal diffusers' attribute paths
(`attn1.to_q`, `attn1.to_out.0`, `ff.net.0.proj`, `ff.net.2`), so checkpoints map by rename and
transpose (`pbe_jax.convert.torch_layout`).

Numerics follow diffusers' default processor (`AttnProcessor2_0`, i.e. `F.scaled_dot_product_
attention` with scale `dim_head ** -0.5`); `upcast_attention` asks the attention core for fp32
scores, which is what diffusers' classic `AttnProcessor` does with it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.attention import dot_product_attention

Dtype = Any

_FF_ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class Attention(nnx.Module):
    """diffusers `Attention` (self- or cross-attention, no masks, no norms on q/k).

    `x` [B, L, query_dim], `context` [B, S, cross_attention_dim] or None (self-attention)
    -> [B, L, query_dim].
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        attention_impl: str = "xla",
    ):
        self.heads, self.dim_head = heads, dim_head
        self.upcast_attention = upcast_attention
        self.attention_impl = attention_impl
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = layers.linear(query_dim, inner, axes=(ax.EMBED, ax.HEADS), use_bias=bias, **kw)
        self.to_k = layers.linear(kv_dim, inner, axes=(ax.EMBED, ax.HEADS), use_bias=bias, **kw)
        self.to_v = layers.linear(kv_dim, inner, axes=(ax.EMBED, ax.HEADS), use_bias=bias, **kw)
        # torch: ModuleList([Linear, Dropout]); the Identity keeps the `to_out.0` index.
        self.to_out = nnx.List([
            layers.linear(inner, query_dim, axes=(ax.HEADS, ax.EMBED), use_bias=out_bias, **kw),
            layers.Identity(),
        ])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, l, _ = x.shape
        s = context.shape[1]
        v = self.to_v(context).reshape(b, s, self.heads, self.dim_head)  # [B, S, H, D]
        if s == 1:
            # One key (the Paint-by-Example context token): softmax over a single score is
            # exactly 1, so the output is v for every query. Skipping q, k and the score matmuls
            # is exact (bitwise, barring NaN/inf in q) and removes an [L, C] x [C, C] matmul
            # per block from the hot path; to_q/to_k get their (mathematically zero) gradient.
            out = jnp.broadcast_to(v, (b, l, self.heads, self.dim_head))
        else:
            q = self.to_q(x).reshape(b, l, self.heads, self.dim_head)  # [B, L, H, D]
            k = self.to_k(context).reshape(b, s, self.heads, self.dim_head)  # [B, S, H, D]
            out = dot_product_attention(
                q, k, v, impl=self.attention_impl, scale=self.dim_head ** -0.5,
                upcast=self.upcast_attention)
        out = out.reshape(b, l, self.heads * self.dim_head)  # [B, L, H*D]
        return self.to_out[0](out)


class GELUProj(nnx.Module):
    """diffusers `GELU` (`proj` Linear then gelu) and `GEGLU` (`proj` to 2x width, split into
    (hidden, gate), hidden * gelu(gate)). [.., dim_in] -> [.., dim_out]."""

    def __init__(self, dim_in: int, dim_out: int, *, gated: bool, approximate: bool = False,
                 bias: bool = True, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.gated, self.approximate = gated, approximate
        width = dim_out * 2 if gated else dim_out
        self.proj = layers.linear(dim_in, width, axes=(ax.EMBED, ax.MLP), use_bias=bias,
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        if not self.gated:
            return jax.nn.gelu(h, approximate=self.approximate)
        h, gate = jnp.split(h, 2, axis=-1)  # torch `.chunk(2, dim=-1)`: hidden first, then gate
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers `FeedForward`: `net = [act(proj), Dropout, Linear]`. [.., dim] -> [.., dim]."""

    def __init__(self, dim: int, *, activation_fn: str = "geglu", mult: int = 4,
                 inner_dim: int | None = None, bias: bool = True, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if activation_fn not in _FF_ACTIVATIONS:
            raise ValueError(f"FeedForward activation_fn {activation_fn!r} not supported; "
                             f"supported: {_FF_ACTIVATIONS}")
        inner = inner_dim if inner_dim is not None else int(dim * mult)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        act = GELUProj(dim, inner, gated=activation_fn == "geglu",
                       approximate=activation_fn == "gelu-approximate", bias=bias, **kw)
        self.net = nnx.List([
            act,
            layers.Identity(),  # torch Dropout slot, keeps `net.2` the output Linear
            layers.linear(inner, dim, axes=(ax.MLP, ax.EMBED), use_bias=bias, **kw),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` with `norm_type='layer_norm'`.

    x = x + attn1(norm1(x))                       (self-attention; cross if only_cross_attention)
    x = x + attn2(norm2(x), context)              (only when cross_attention_dim is given)
    x = x + ff(norm3(x))

    `hidden_states` [B, L, dim], `encoder_hidden_states` [B, S, cross_attention_dim] or None
    -> [B, L, dim].
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        ff_inner_dim: int | None = None,
        ff_bias: bool = True,
        attention_out_bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        attention_impl: str = "xla",
    ):
        if not norm_elementwise_affine:
            raise ValueError("BasicTransformerBlock: norm_elementwise_affine=False is not supported")
        self.only_cross_attention = only_cross_attention
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                       out_bias=attention_out_bias, upcast_attention=upcast_attention,
                       attention_impl=attention_impl, **kw)
        self.norm1 = layers.layer_norm(dim, eps=norm_eps, **kw)
        self.attn1 = Attention(
            dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **attn_kw)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = layers.layer_norm(dim, eps=norm_eps, **kw)
            self.attn2 = Attention(
                dim, cross_attention_dim=None if double_self_attention else cross_attention_dim,
                **attn_kw)
        else:  # diffusers has no norm2/attn2 here (the PbE mapper): neither do we.
            self.norm2 = self.attn2 = None
        self.norm3 = layers.layer_norm(dim, eps=norm_eps, **kw)
        self.ff = FeedForward(dim, activation_fn=activation_fn, inner_dim=ff_inner_dim,
                              bias=ff_bias, **kw)

    def __call__(self, hidden_states: jax.Array,
                 encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        x = hidden_states
        ctx1 = encoder_hidden_states if self.only_cross_attention else None
        x = x + self.attn1(self.norm1(x), ctx1)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))
