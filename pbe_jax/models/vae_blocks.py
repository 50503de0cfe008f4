"""The blocks of the SD VAE (diffusers `AutoencoderKL`): resnets, resampling, mid-block attention,
`Encoder` and `Decoder`.

Every module mirrors the diffusers class of the same name, attribute for attribute, so its NNX
param paths are the diffusers state-dict keys (`down_blocks.0.resnets.1.conv1.kernel` <->
`down_blocks.0.resnets.1.conv1.weight`). Activations are NHWC `[B, H, W, C]`; params fp32,
compute in `dtype`. Only the configuration the VAE uses is implemented (no time embedding, no
spatial norm, `output_scale_factor` 1), which `VAEConfig.from_dict` enforces.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models.attention import dot_product_attention
from pbe_jax.models.layers import GroupNorm, Identity, activation, conv, group_norm, linear, maybe_remat

Dtype = Any

# Every norm inside diffusers' VAE Encoder/Decoder uses eps 1e-6 (torch's default is 1e-5).
VAE_NORM_EPS = 1e-6


def _norm(channels: int, rngs: nnx.Rngs, *, groups: int, param_dtype: Dtype) -> GroupNorm:
    """GroupNorm computing in fp32 whatever the model dtype: its output goes through the
    activation in fp32 and is rounded to the compute dtype once, by the next conv/linear (XLA
    fuses norm + act + cast, so no fp32 activation is stored). Rounding twice instead (norm
    output, then activation output) made the bf16-vs-fp32 error of the tiny test VAEs about
    1.3-1.6x larger."""
    return group_norm(channels, rngs, num_groups=groups, eps=VAE_NORM_EPS, dtype=jnp.float32,
                      param_dtype=param_dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` without time embedding: GN-act-conv-GN-act-conv + skip.

    [B, H, W, in_channels] -> [B, H, W, out_channels]. The skip is a 1x1 `conv_shortcut` when the
    channel count changes. Dropout is 0 in the VAE, so it is left out.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, act_fn: str,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = _norm(in_channels, rngs, groups=groups, param_dtype=param_dtype)
        self.conv1 = conv(in_channels, out_channels, rngs, kernel_size=3, padding=1, **kw)
        self.norm2 = _norm(out_channels, rngs, groups=groups, param_dtype=param_dtype)
        self.conv2 = conv(out_channels, out_channels, rngs, kernel_size=3, padding=1, **kw)
        self.conv_shortcut = (
            conv(in_channels, out_channels, rngs, kernel_size=1, padding=0, **kw)
            if in_channels != out_channels else None
        )
        self.act = activation(act_fn)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample2D(nnx.Module):
    """diffusers `Downsample2D(use_conv=True, padding=0)`: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].

    diffusers pads (left 0, right 1, top 0, bottom 1) with zeros and then runs a 3x3 stride-2 conv
    without padding. The same asymmetric zero padding is given to the conv itself here, which is
    the identical computation in one op.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.conv = conv(channels, channels, rngs, kernel_size=3, stride=2, padding=((0, 1), (0, 1)),
                         dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest x2 then 3x3 conv. [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.conv = conv(channels, channels, rngs, kernel_size=3, padding=1, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        # nearest-neighbour x2 as a broadcast + reshape (no gather): [B, H, 1, W, 1, C] -> [B, 2H, 2W, C]
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class VAEAttention(nnx.Module):
    """The VAE mid-block self-attention (diffusers `Attention(_from_deprecated_attn_block=True)`).

    One head of width C over the H*W positions: GroupNorm, q/k/v linears, softmax attention with
    scale C**-0.5, `to_out.0` linear, residual add (rescale_output_factor is 1).
    [B, H, W, C] -> [B, H, W, C].
    """

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.group_norm = _norm(channels, rngs, groups=groups, param_dtype=param_dtype)
        self.to_q = linear(channels, channels, rngs, axes=(ax.EMBED, ax.HEADS), **kw)
        self.to_k = linear(channels, channels, rngs, axes=(ax.EMBED, ax.HEADS), **kw)
        self.to_v = linear(channels, channels, rngs, axes=(ax.EMBED, ax.HEADS), **kw)
        # torch `to_out = ModuleList([Linear, Dropout])`: keep index 0 as the key `to_out.0`.
        self.to_out = nnx.List([linear(channels, channels, rngs, axes=(ax.HEADS, ax.EMBED), **kw),
                                Identity()])
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)  # [B, H*W, C]
        # a single head: [B, H*W, 1, C], the layout dot_product_attention takes
        q, k, v = (proj(y)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        y = dot_product_attention(q, k, v, impl=self.attention_impl)  # [B, H*W, 1, C]
        y = self.to_out[0](y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return x + y


class UNetMidBlock2D(nnx.Module):
    """diffusers `UNetMidBlock2D` as the VAE builds it: resnet, (attention, resnet) once.

    [B, H, W, C] -> [B, H, W, C]. With `add_attention=False` the attention list is empty, as the
    torch state dict has no keys for it.
    """

    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, act_fn=act_fn, **kw)
                                 for _ in range(2)])
        self.attentions = nnx.List(
            [VAEAttention(channels, groups=groups, attention_impl=attention_impl, **kw)]
            if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """diffusers `DownEncoderBlock2D`: `num_layers` resnets, then an optional stride-2 downsampler.

    [B, H, W, in_channels] -> [B, H/2, W/2, out_channels] (H, W unchanged without downsampler).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 act_fn: str, add_downsample: bool, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                          act_fn=act_fn, **kw)
            for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional nearest-x2 upsampler.

    [B, H, W, in_channels] -> [B, 2H, 2W, out_channels] (H, W unchanged without upsampler).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 act_fn: str, add_upsample: bool, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups,
                          act_fn=act_fn, **kw)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


class Encoder(nnx.Module):
    """diffusers `vae.Encoder` with `double_z=True`.

    [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (moments: mean then logvar),
    f = 2 ** (len(block_out_channels) - 1).
    """

    def __init__(self, *, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, act_fn: str, mid_block_add_attention: bool,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla", remat: bool = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = tuple(block_out_channels)
        self.conv_in = conv(in_channels, chans[0], rngs, kernel_size=3, padding=1,
                            dtype=dtype, param_dtype=param_dtype)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(chans[max(i - 1, 0)], chans[i], num_layers=layers_per_block,
                               groups=groups, act_fn=act_fn, add_downsample=i < len(chans) - 1, **kw)
            for i in range(len(chans))])
        self.mid_block = UNetMidBlock2D(chans[-1], groups=groups, act_fn=act_fn,
                                        add_attention=mid_block_add_attention,
                                        attention_impl=attention_impl, **kw)
        self.conv_norm_out = _norm(chans[-1], rngs, groups=groups, param_dtype=param_dtype)
        self.conv_out = conv(chans[-1], 2 * latent_channels, rngs, kernel_size=3, padding=1,
                             dtype=dtype, param_dtype=param_dtype)
        self.act = activation(act_fn)
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        run: Callable = maybe_remat(_call_block, self.remat)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = run(block, x)
        x = run(self.mid_block, x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `vae.Decoder` (group norm). The up path mirrors the encoder with one more resnet
    per block (`layers_per_block + 1`), as diffusers and the original LDM code do.

    [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels].
    """

    def __init__(self, *, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, groups: int, act_fn: str, mid_block_add_attention: bool,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla", remat: bool = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev = tuple(reversed(block_out_channels))
        self.conv_in = conv(latent_channels, rev[0], rngs, kernel_size=3, padding=1,
                            dtype=dtype, param_dtype=param_dtype)
        self.mid_block = UNetMidBlock2D(rev[0], groups=groups, act_fn=act_fn,
                                        add_attention=mid_block_add_attention,
                                        attention_impl=attention_impl, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=layers_per_block + 1,
                             groups=groups, act_fn=act_fn, add_upsample=i < len(rev) - 1, **kw)
            for i in range(len(rev))])
        self.conv_norm_out = _norm(rev[-1], rngs, groups=groups, param_dtype=param_dtype)
        self.conv_out = conv(rev[-1], out_channels, rngs, kernel_size=3, padding=1,
                             dtype=dtype, param_dtype=param_dtype)
        self.act = activation(act_fn)
        self.remat = remat

    def __call__(self, z: jax.Array) -> jax.Array:
        run: Callable = maybe_remat(_call_block, self.remat)
        x = self.conv_in(z)
        x = run(self.mid_block, x)
        for block in self.up_blocks:
            x = run(block, x)
        return self.conv_out(self.act(self.conv_norm_out(x)))
