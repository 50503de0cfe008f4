"""The blocks of diffusers' `UNet2DConditionModel` (SD-1.x/2.x family) in Flax NNX, NHWC.

`ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `Transformer2DModel` (continuous input) and the
down/mid/up blocks `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
`CrossAttnUpBlock2D`, `UpBlock2D`. Attribute names equal diffusers' (`resnets`, `attentions`,
`downsamplers.0.conv`, `upsamplers.0.conv`, `transformer_blocks`, ...), so parameter paths are
diffusers' state-dict keys after `pbe_jax.convert.torch_layout` renaming.

Activations are NHWC ([B, H, W, C]); `temb` is [B, T]; the context is [B, S, D].
With `BlockOpts.remat`, every ResnetBlock2D and every Transformer2DModel call is rematerialised
(gradient checkpointing per block, as diffusers' `enable_gradient_checkpointing`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.transformer import BasicTransformerBlock

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BlockOpts:
    """Runtime options shared by every block (static, hashable)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: bool = False
    remat_policy: str | None = None

    def kw(self, rngs: nnx.Rngs) -> dict:
        return dict(rngs=rngs, dtype=self.dtype, param_dtype=self.param_dtype)


def _call_resnet(resnet, x, temb):
    return resnet(x, temb)


def _call_transformer(attn, x, context):
    return attn(x, context)


def run_resnet(resnet: "ResnetBlock2D", x: jax.Array, temb: jax.Array, opts: BlockOpts) -> jax.Array:
    return layers.maybe_remat(_call_resnet, opts.remat, opts.remat_policy)(resnet, x, temb)


def run_transformer(attn: "Transformer2DModel", x: jax.Array, context: jax.Array,
                    opts: BlockOpts) -> jax.Array:
    return layers.maybe_remat(_call_transformer, opts.remat, opts.remat_policy)(attn, x, context)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` (pre-norm, time_embedding_norm='default').

    x [B, H, W, in_channels], temb [B, temb_channels] -> [B, H, W, out_channels].
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int,
                 groups_out: int | None = None, eps: float = 1e-6, act_fn: str = "silu",
                 output_scale_factor: float = 1.0, rngs: nnx.Rngs, opts: BlockOpts):
        kw = opts.kw(rngs)
        self.act_fn = act_fn  # a name (static, hashable), looked up at call time
        self.output_scale_factor = output_scale_factor
        self.norm1 = layers.group_norm(in_channels, num_groups=groups, eps=eps, **kw)
        self.conv1 = layers.conv(in_channels, out_channels, kernel_size=3, padding=1, **kw)
        self.time_emb_proj = layers.linear(temb_channels, out_channels,
                                           axes=(ax.EMBED, ax.CONV_OUT), **kw)
        self.norm2 = layers.group_norm(out_channels, num_groups=groups_out or groups, eps=eps, **kw)
        self.conv2 = layers.conv(out_channels, out_channels, kernel_size=3, padding=1, **kw)
        self.conv_shortcut = (
            layers.conv(in_channels, out_channels, kernel_size=1, padding=0, **kw)
            if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = layers.activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        t = self.time_emb_proj(act(temb))  # [B, out]
        h = h + t[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))  # dropout (p=0 in SD) omitted
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """3x3 conv, stride 2. `padding=0` pads right/bottom by one as diffusers does.
    [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C] (for padding 1)."""

    def __init__(self, channels: int, *, padding: int = 1, rngs: nnx.Rngs, opts: BlockOpts):
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding), (padding, padding))
        self.conv = layers.conv(channels, channels, kernel_size=3, stride=2, padding=pad,
                                **opts.kw(rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # torch F.interpolate(mode='nearest', size=...): src = min(floor(dst * in / out), in - 1),
    # with the scale in float32.
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of [B, H, W, C]: x2 by default, else to `size` (torch's rule)."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        # broadcast + reshape: one copy, no gather
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))  # [B, H, 2, W, 2, C]
        return x.reshape(b, 2 * h, 2 * w, c)
    x = jnp.take(x, _nearest_indices(h, size[0]), axis=1)
    return jnp.take(x, _nearest_indices(w, size[1]), axis=2)


class Upsample2D(nnx.Module):
    """Nearest x2 (or to `output_size`) then 3x3 conv. [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, opts: BlockOpts):
        self.conv = layers.conv(channels, channels, kernel_size=3, padding=1, **opts.kw(rngs))

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        return self.conv(upsample_nearest(x, output_size))


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` on continuous input (GroupNorm eps 1e-6, proj_in, blocks,
    proj_out, residual). proj_in/proj_out are 1x1 convs, or Linears with `use_linear_projection`.

    x [B, H, W, C], context [B, S, D] -> [B, H, W, C].
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *,
                 num_layers: int = 1, cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, rngs: nnx.Rngs, opts: BlockOpts):
        kw = opts.kw(rngs)
        inner = num_attention_heads * attention_head_dim
        self.norm = layers.group_norm(in_channels, num_groups=norm_num_groups, eps=1e-6, **kw)
        if use_linear_projection:
            self.proj_in = layers.linear(in_channels, inner, axes=(ax.CONV_IN, ax.CONV_OUT), **kw)
            self.proj_out = layers.linear(inner, in_channels, axes=(ax.CONV_IN, ax.CONV_OUT), **kw)
        else:
            self.proj_in = layers.conv(in_channels, inner, kernel_size=1, padding=0, **kw)
            self.proj_out = layers.conv(inner, in_channels, kernel_size=1, padding=0, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim,
                cross_attention_dim=cross_attention_dim, only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention, attention_impl=opts.attention_impl, **kw)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, h, w, _ = x.shape
        # NHWC: the token sequence is a free reshape of the spatial grid, no transpose needed;
        # a 1x1 conv and a Linear over the channel axis are the same op here.
        hid = self.proj_in(self.norm(x))  # [B, H, W, inner]
        inner = hid.shape[-1]
        hid = hid.reshape(b, h * w, inner)  # [B, HW, inner]
        for block in self.transformer_blocks:
            hid = block(hid, context)
        hid = hid.reshape(b, h, w, inner)  # [B, H, W, inner]
        return self.proj_out(hid) + x


def _transformer(heads: int, channels: int, n_layers: int, cfg: dict, rngs, opts) -> Transformer2DModel:
    # diffusers passes (num_attention_heads, out_channels // num_attention_heads)
    return Transformer2DModel(heads, channels // heads, channels, num_layers=n_layers,
                              cross_attention_dim=cfg["cross_attention_dim"],
                              norm_num_groups=cfg["groups"],
                              use_linear_projection=cfg["use_linear_projection"],
                              only_cross_attention=cfg.get("only_cross_attention", False),
                              upcast_attention=cfg["upcast_attention"], rngs=rngs, opts=opts)


class DownBlock2D(nnx.Module):
    """`num_layers` ResnetBlock2D (+ Transformer2DModel each when `attention` is given), then an
    optional Downsample2D. Returns (hidden [B, H', W', C], skips: one per resnet + downsample).

    `attention`: None for diffusers' `DownBlock2D`; for `CrossAttnDownBlock2D` a dict with
    heads, transformer_layers, cross_attention_dim, use_linear_projection, only_cross_attention,
    upcast_attention.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 groups: int, eps: float, act_fn: str, add_downsample: bool, downsample_padding: int,
                 attention: dict | None = None, rngs: nnx.Rngs, opts: BlockOpts):
        self.opts = opts
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          groups=groups, eps=eps, act_fn=act_fn, rngs=rngs, opts=opts)
            for i in range(num_layers)])
        if attention is not None:
            cfg = dict(attention, groups=groups)
            layers_per = _per_layer(attention["transformer_layers"], num_layers)
            self.attentions = nnx.List([
                _transformer(attention["heads"], out_channels, layers_per[i], cfg, rngs, opts)
                for i in range(num_layers)])
        else:
            self.attentions = None
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs, opts=opts)])
            if add_downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = run_resnet(resnet, x, temb, self.opts)
            if self.attentions is not None:
                x = run_transformer(self.attentions[i], x, context, self.opts)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """diffusers `CrossAttnDownBlock2D`: resnet -> Transformer2DModel, per layer."""


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (Transformer2DModel, resnet) x num_layers. [B, H, W, C] -> [B, H, W, C]."""

    def __init__(self, channels: int, temb_channels: int, *, groups: int, eps: float, act_fn: str,
                 output_scale_factor: float, attention: dict, num_layers: int = 1,
                 rngs: nnx.Rngs, opts: BlockOpts):
        self.opts = opts
        res_kw = dict(groups=groups, eps=eps, act_fn=act_fn, output_scale_factor=output_scale_factor,
                      rngs=rngs, opts=opts)
        # diffusers' mid block has no only_cross_attention switch for its transformers
        cfg = dict(attention, groups=groups, only_cross_attention=False)
        layers_per = _per_layer(attention["transformer_layers"], num_layers)
        resnets = [ResnetBlock2D(channels, channels, temb_channels, **res_kw)]
        attns = []
        for i in range(num_layers):
            attns.append(_transformer(attention["heads"], channels, layers_per[i], cfg, rngs, opts))
            resnets.append(ResnetBlock2D(channels, channels, temb_channels, **res_kw))
        self.attentions = nnx.List(attns)
        self.resnets = nnx.List(resnets)

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = run_resnet(self.resnets[0], x, temb, self.opts)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = run_transformer(attn, x, context, self.opts)
            x = run_resnet(resnet, x, temb, self.opts)
        return x


class UpBlock2D(nnx.Module):
    """`num_layers` x (concat skip, ResnetBlock2D[, Transformer2DModel]), optional Upsample2D.

    x [B, H, W, prev_output_channel], skips: the last `num_layers` skips of the down path
    (consumed last first) -> [B, 2H, 2W, out_channels] (or [B, H, W, ...] without upsampler).
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, *, num_layers: int, groups: int, eps: float, act_fn: str,
                 add_upsample: bool, attention: dict | None = None, rngs: nnx.Rngs, opts: BlockOpts):
        self.opts = opts
        resnets = []
        for i in range(num_layers):
            res_skip = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(res_in + res_skip, out_channels, temb_channels,
                                         groups=groups, eps=eps, act_fn=act_fn, rngs=rngs, opts=opts))
        self.resnets = nnx.List(resnets)
        if attention is not None:
            cfg = dict(attention, groups=groups)
            layers_per = _per_layer(attention["transformer_layers"], num_layers)
            self.attentions = nnx.List([
                _transformer(attention["heads"], out_channels, layers_per[i], cfg, rngs, opts)
                for i in range(num_layers)])
        else:
            self.attentions = None
        self.upsamplers = (nnx.List([Upsample2D(out_channels, rngs=rngs, opts=opts)])
                           if add_upsample else None)

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array,
                 context: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # torch cat on dim 1 == NHWC axis -1
            x = run_resnet(resnet, x, temb, self.opts)
            if self.attentions is not None:
                x = run_transformer(self.attentions[i], x, context, self.opts)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """diffusers `CrossAttnUpBlock2D`: (concat skip, resnet, Transformer2DModel) per layer."""


def _per_layer(n: int | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """`transformer_layers_per_block` for one block: an int for every layer, or one per layer."""
    if isinstance(n, int):
        return (n,) * num_layers
    if len(n) != num_layers:
        raise ValueError(f"transformer_layers_per_block {n}: expected {num_layers} entries")
    return tuple(n)
