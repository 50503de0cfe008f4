"""diffusers' `UNet2DConditionModel` (SD-1.x/2.x family) in Flax NNX, NHWC.

Built from the fields of diffusers' `unet/config.json` (`UNetConfig`). Parameter paths equal
diffusers' state-dict keys after `pbe_jax.convert.torch_layout` renaming, so
`UNet2DConditionModel.from_pretrained(<diffusers unet dir>)` loads a diffusers checkpoint and
`save_pretrained` writes one diffusers loads. Blocks live in `pbe_jax.models.unet_blocks`.

Call: `unet(sample [B, H, W, C_in], timesteps [B] | scalar, encoder_hidden_states [B, S, D])
-> [B, H, W, C_out]` in the compute dtype.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.registry import register
from pbe_jax.models.unet_blocks import (
    BlockOpts,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

Dtype = Any

# The diffusers version our config.json output was checked against (metadata only).
_DIFFUSERS_VERSION = "0.42.1"
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers fields we do not implement: accepted only at these values (their diffusers defaults).
_FIXED = {
    "num_attention_heads": None,  # diffusers itself raises when this is set (issue 2011)
    "dual_cross_attention": False,
    "dropout": 0.0,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}
# Metadata, and fields that do not affect the block types we build (diffusers only reads
# `resnet_out_scale_factor` / `mid_block_only_cross_attention` / `addition_embed_type_num_heads`
# in Simple* blocks and addition embeddings, which we reject above).
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
            "resnet_out_scale_factor", "mid_block_only_cross_attention",
            "addition_embed_type_num_heads"}


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' `UNet2DConditionModel` config that pbe_jax implements.

    Per-block fields (`attention_head_dim`, `cross_attention_dim`, `layers_per_block`,
    `transformer_layers_per_block`, `only_cross_attention`) take an int/bool or one per block.
    As in diffusers, `attention_head_dim` is the number of heads per block (head width is
    channels // heads).
    """

    sample_size: int | tuple[int, int] | None = None  # config round trip only
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        self._validate()

    def _validate(self):
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(f"UNetConfig: down_block_types {self.down_block_types}, up_block_types "
                             f"{self.up_block_types} and block_out_channels {self.block_out_channels} "
                             "must have the same length")
        for name, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
            for t in getattr(self, name):
                if t not in allowed:
                    raise ValueError(f"UNetConfig.{name}: {t!r} not supported; supported: {allowed}")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"UNetConfig.mid_block_type: {self.mid_block_type!r} not supported; "
                             f"supported: {_MID_TYPES}")
        for name in ("only_cross_attention", "layers_per_block", "cross_attention_dim",
                     "transformer_layers_per_block", "attention_head_dim"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"UNetConfig.{name}: {v} has {len(v)} entries, expected {n}")
            if isinstance(v, tuple) and any(isinstance(x, tuple) for x in v):
                raise ValueError(f"UNetConfig.{name}: nested per-layer lists are not supported ({v})")
        if self.norm_num_groups is None:
            raise ValueError("UNetConfig.norm_num_groups: None (no output GroupNorm) is not supported")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNetConfig.downsample_padding: {self.downsample_padding} not in (0, 1)")
        layers.activation(self.act_fn)  # raises ValueError naming the activation

    @classmethod
    def from_dict(cls, raw: dict) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict; rejects settings we do not implement."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key in names:
                kwargs[key] = value
            elif key in _FIXED:
                if _tuple(value) != _FIXED[key]:
                    raise ValueError(f"UNet config field {key}={value!r} is not supported "
                                     f"(only {_FIXED[key]!r})")
            elif key not in _IGNORED:
                raise ValueError(f"UNet config field {key!r} is unknown to pbe_jax (value {value!r})")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A full diffusers `config.json` dict (lists for tuples)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, tuple) else v

        out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION}
        out.update({k: plain(v) for k, v in dataclasses.asdict(self).items()})
        out.update(_FIXED)
        return out

    @classmethod
    def paint_by_example(cls) -> "UNetConfig":
        """The SD-1.x Paint-by-Example UNet (PBE_SPEC.md section 5.2): 9 input channels
        (noisy latent 4 | masked-image latent 4 | mask 1), 768-d single-token context."""
        return cls(sample_size=64, in_channels=9, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                   attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
                   norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
                   transformer_layers_per_block=1)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,) * n


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> jax.Array:
    """diffusers `get_timestep_embedding` (sinusoidal): t [B] -> [B, dim] fp32."""
    half = dim // 2
    # Trace-time constants. The exponent is computed in fp32 as torch does; exp is taken in fp64
    # and rounded, which matches torch's fp32 exp far more often than numpy's fp32 exp does.
    # (A 1-ulp frequency error becomes ~1e-4 in sin(999 * f).)
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    arg = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """`linear_1`, act, `linear_2`: [B, in_dim] -> [B, time_dim]."""

    def __init__(self, in_dim: int, time_dim: int, *, act_fn: str, rngs: nnx.Rngs, opts: BlockOpts):
        kw = opts.kw(rngs)
        self.act_fn = act_fn
        self.linear_1 = layers.linear(in_dim, time_dim, axes=(ax.EMBED, ax.MLP), **kw)
        self.linear_2 = layers.linear(time_dim, time_dim, axes=(ax.MLP, ax.EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(layers.activation(self.act_fn)(self.linear_1(x)))


@register("diffusers")
class UNet2DConditionModel(PretrainedMixin, nnx.Module):
    """diffusers `UNet2DConditionModel` (see module docstring). NHWC in and out."""

    config_class = UNetConfig
    WEIGHTS_NAMES = ("diffusion_pytorch_model",)

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, attention_impl: str = "xla",
                 remat: bool = False, remat_policy: str | None = None):
        self.config = config
        self.opts = opts = BlockOpts(dtype, param_dtype, attention_impl, remat, remat_policy)
        kw = opts.kw(rngs)
        c0 = config.block_out_channels[0]
        time_dim = config.time_embedding_dim or 4 * c0
        self.conv_in = layers.conv(config.in_channels, c0, kernel_size=3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(c0, time_dim, act_fn=config.act_fn, rngs=rngs,
                                                opts=opts)
        self.down_blocks = nnx.List(_build_down(config, time_dim, rngs, opts))
        self.mid_block = _build_mid(config, time_dim, rngs, opts)
        self.up_blocks = nnx.List(_build_up(config, time_dim, rngs, opts))
        self.conv_norm_out = layers.group_norm(c0, num_groups=config.norm_num_groups,
                                               eps=config.norm_eps, **kw)
        self.conv_out = layers.conv(c0, config.out_channels, kernel_size=3, padding=1, **kw)

    def time_embed(self, timesteps, batch: int) -> jax.Array:
        """timesteps (int/float scalar, [1] or [B]) -> temb [B, time_dim] in the compute dtype."""
        t = jnp.asarray(timesteps, jnp.float32)  # torch: `timesteps[:, None].float()`
        t = jnp.broadcast_to(t.reshape(-1), (batch,))
        cfg = self.config
        emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
        return self.time_embedding(emb.astype(self.opts.dtype))

    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array) -> jax.Array:
        """sample [B, H, W, C_in], timesteps [B] | scalar, encoder_hidden_states [B, S, D]
        -> [B, H, W, C_out]."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.time_embed(timesteps, sample.shape[0])
        ctx = encoder_hidden_states
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, temb, ctx)
            skips.extend(res)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, ctx)
        # Sizes not divisible by the total downsampling: upsample to the skip's size, as diffusers.
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(d % factor for d in sample.shape[1:3])
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            size = tuple(skips[-1].shape[1:3]) if odd and i < len(self.up_blocks) - 1 else None
            x = block(x, res, temb, ctx, size)
        x = layers.activation(self.config.act_fn)(self.conv_norm_out(x))
        return self.conv_out(x)


def _attention_cfg(config: UNetConfig, heads: int, n_layers, cross_dim: int, only_cross: bool) -> dict:
    return dict(heads=heads, transformer_layers=n_layers, cross_attention_dim=cross_dim,
                use_linear_projection=config.use_linear_projection,
                only_cross_attention=only_cross, upcast_attention=config.upcast_attention)


def _build_down(config: UNetConfig, time_dim: int, rngs, opts) -> list:
    n = len(config.down_block_types)
    heads = _per_block(config.attention_head_dim, n)  # diffusers: num_attention_heads = this
    cross = _per_block(config.cross_attention_dim, n)
    lpb = _per_block(config.layers_per_block, n)
    tlpb = _per_block(config.transformer_layers_per_block, n)
    only_cross = _per_block(config.only_cross_attention, n)
    blocks, out_ch = [], config.block_out_channels[0]
    for i, kind in enumerate(config.down_block_types):
        in_ch, out_ch = out_ch, config.block_out_channels[i]
        attn = (_attention_cfg(config, heads[i], tlpb[i], cross[i], only_cross[i])
                if kind == "CrossAttnDownBlock2D" else None)
        cls = CrossAttnDownBlock2D if attn else DownBlock2D
        blocks.append(cls(in_ch, out_ch, time_dim, num_layers=lpb[i], groups=config.norm_num_groups,
                          eps=config.norm_eps, act_fn=config.act_fn, add_downsample=i < n - 1,
                          downsample_padding=config.downsample_padding, attention=attn,
                          rngs=rngs, opts=opts))
    return blocks


def _build_mid(config: UNetConfig, time_dim: int, rngs, opts):
    if config.mid_block_type is None:
        return None
    n = len(config.down_block_types)
    attn = _attention_cfg(config, _per_block(config.attention_head_dim, n)[-1],
                          _per_block(config.transformer_layers_per_block, n)[-1],
                          _per_block(config.cross_attention_dim, n)[-1], False)
    return UNetMidBlock2DCrossAttn(
        config.block_out_channels[-1], time_dim, groups=config.norm_num_groups, eps=config.norm_eps,
        act_fn=config.act_fn, output_scale_factor=config.mid_block_scale_factor, attention=attn,
        rngs=rngs, opts=opts)


def _build_up(config: UNetConfig, time_dim: int, rngs, opts) -> list:
    n = len(config.up_block_types)
    rev = lambda v: tuple(reversed(_per_block(v, n)))  # noqa: E731
    heads, cross = rev(config.attention_head_dim), rev(config.cross_attention_dim)
    lpb, tlpb = rev(config.layers_per_block), rev(config.transformer_layers_per_block)
    only_cross, chans = rev(config.only_cross_attention), rev(config.block_out_channels)
    blocks, out_ch = [], chans[0]
    for i, kind in enumerate(config.up_block_types):
        prev_ch, out_ch = out_ch, chans[i]
        in_ch = chans[min(i + 1, n - 1)]
        attn = (_attention_cfg(config, heads[i], tlpb[i], cross[i], only_cross[i])
                if kind == "CrossAttnUpBlock2D" else None)
        cls = CrossAttnUpBlock2D if attn else UpBlock2D
        blocks.append(cls(in_ch, prev_ch, out_ch, time_dim, num_layers=lpb[i] + 1,
                          groups=config.norm_num_groups, eps=config.norm_eps, act_fn=config.act_fn,
                          add_upsample=i < n - 1, attention=attn, rngs=rngs, opts=opts))
    return blocks
