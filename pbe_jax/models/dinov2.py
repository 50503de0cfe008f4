"""The DINOv2 vision tower (transformers `Dinov2Model` / `Dinov2WithRegistersModel`) in NNX.

AnyDoor-style exemplar conditioning reads DINOv2's tokens of the reference (class + patch
tokens; the register tokens of the `with-registers` checkpoints are dropped, see
`class_and_patch_tokens`).

Parameter paths mirror the keys of the released checkpoints (`facebook/dinov2-*`,
`facebook/dinov2-with-registers-*`), which transformers still writes with `save_pretrained`:

    embeddings.{cls_token [1, 1, D], mask_token [1, D], position_embeddings [1, 1 + P, D]}
    embeddings.register_tokens [1, R, D]                           (with registers only)
    embeddings.patch_embeddings.projection                         (Conv2d p x p, stride p)
    encoder.layer.<i>.norm1
    encoder.layer.<i>.attention.attention.{query, key, value}
    encoder.layer.<i>.attention.output.dense
    encoder.layer.<i>.layer_scale1.lambda1
    encoder.layer.<i>.norm2
    encoder.layer.<i>.mlp.{fc1, fc2}                               (use_swiglu_ffn=False)
    encoder.layer.<i>.mlp.{weights_in, weights_out}                (use_swiglu_ffn=True, ViT-g)
    encoder.layer.<i>.layer_scale2.lambda1
    layernorm

transformers 5 renames these in memory (`attention.q_proj`, `attention.o_proj`,
`mlp.gate_proj` + `mlp.up_proj` = the two halves of `weights_in`, `mlp.down_proj`); such a state
dict is accepted too (`rename_legacy_keys`).

Inputs are NHWC `pixel_values` [B, H, W, 3], normalised with `DINOV2_MEAN` / `DINOV2_STD`. Any
H, W >= patch_size works: the learned position embeddings (a square grid for `image_size`) are
resampled to the input's patch grid exactly as transformers does (`bicubic_resize_matrix`). The
tower always runs as in `eval()`: dropout and drop path (stochastic depth) are training-only and
not implemented.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.attention import dot_product_attention
from pbe_jax.models.clip import _GENERIC_CONFIG_KEYS
from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.registry import register

logger = logging.getLogger(__name__)

# The image processor of every facebook/dinov2-* checkpoint (BitImageProcessor): ImageNet
# mean / std, shortest edge resized to 256 (bicubic), centre crop 224.
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
DINOV2_RESIZE = 256
DINOV2_CROP = 224
# That processor's preprocessor_config.json (resample 3 = PIL bicubic).
DINOV2_PREPROCESSOR_CONFIG = {
    "image_processor_type": "BitImageProcessor", "do_resize": True,
    "size": {"shortest_edge": DINOV2_RESIZE}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": DINOV2_CROP, "width": DINOV2_CROP}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(DINOV2_MEAN),
    "image_std": list(DINOV2_STD), "do_convert_rgb": True,
}

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_ARCHITECTURES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
# transformers' defaults that differ between the two configs (used for keys a config.json omits).
_TYPE_DEFAULTS = {"dinov2": {}, "dinov2_with_registers": {"patch_size": 16, "num_register_tokens": 4}}
# Config keys that say nothing about the forward pass of the bare model: Dinov2Backbone's
# feature selection, and the dropouts (the tower runs in eval mode).
_IGNORED_CONFIG_KEYS = _GENERIC_CONFIG_KEYS | frozenset({
    "hidden_dropout_prob", "attention_probs_dropout_prob", "out_features", "out_indices",
    "_out_features", "_out_indices", "stage_names", "apply_layernorm", "reshape_hidden_states",
})
_SUPPORTED_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish")


def _square(name: str, value) -> int:
    """transformers 5 allows `image_size`/`patch_size` as [h, w]; the position grid is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"DINOv2 config: {name}={value!r}; only square sizes are supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Hyper-parameters of the DINOv2 tower: the fields of transformers' `Dinov2Config` /
    `Dinov2WithRegistersConfig` that change the forward pass, plus `model_type` (which of the two;
    it decides the class, the register tokens and the position-embedding resampling).
    Defaults are transformers' `Dinov2Config()` (ViT-B/14 at 224 px)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    # dinov2 only (the registers model always has a mask token)
    use_mask_token: bool = True
    num_register_tokens: int = 0
    # Training only (stochastic depth); kept so that config.json round-trips, ignored here.
    drop_path_rate: float = 0.0
    model_type: str = "dinov2"

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"DINOv2 config: model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"DINOv2 config: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ValueError(f"DINOv2 config: hidden_act {self.hidden_act!r} not supported; "
                             f"use one of {_SUPPORTED_ACTS}")
        if self.image_size < self.patch_size:
            raise ValueError(f"DINOv2 config: image_size {self.image_size} < patch_size {self.patch_size}")
        if self.num_register_tokens < 0:
            raise ValueError(f"DINOv2 config: num_register_tokens {self.num_register_tokens} < 0")
        if self.model_type == "dinov2" and self.num_register_tokens:
            raise ValueError(f"DINOv2 config: num_register_tokens={self.num_register_tokens} needs "
                             "model_type 'dinov2_with_registers'")
        if self.model_type == "dinov2_with_registers" and not self.use_mask_token:
            raise ValueError("DINOv2 config: Dinov2WithRegistersModel always has a mask token "
                             "(use_mask_token=False is a Dinov2Model option)")

    @property
    def with_registers(self) -> bool:
        return self.model_type == "dinov2_with_registers"

    @property
    def architecture(self) -> str:
        return _ARCHITECTURES[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """Patch positions the learned embedding table holds (a square grid), CLS excluded."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def ffn_hidden_size(self) -> int:
        """transformers' rounding: int(D * mlp_ratio); SwiGLU keeps 2/3 of it, rounded up to 8."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

    def num_tokens(self, height: int, width: int) -> int:
        """Tokens of `last_hidden_state` for an H x W input: 1 + R + (H//p)(W//p)."""
        return 1 + self.num_register_tokens + (height // self.patch_size) * (width // self.patch_size)

    # --------------------------------------------------------------------- presets

    @classmethod
    def _vit(cls, hidden, layers_, heads, swiglu, registers):
        return cls(hidden_size=hidden, num_hidden_layers=layers_, num_attention_heads=heads,
                   mlp_ratio=4, image_size=518, patch_size=14, layer_norm_eps=1e-6,
                   layerscale_value=1.0, use_swiglu_ffn=swiglu, hidden_act="gelu",
                   num_register_tokens=4 if registers else 0,
                   model_type="dinov2_with_registers" if registers else "dinov2")

    @classmethod
    def vit_s14(cls, registers: bool = False) -> "Dinov2Config":
        """facebook/dinov2-small (with registers: facebook/dinov2-with-registers-small)."""
        return cls._vit(384, 12, 6, False, registers)

    @classmethod
    def vit_b14(cls, registers: bool = False) -> "Dinov2Config":
        """facebook/dinov2-base (with registers: facebook/dinov2-with-registers-base)."""
        return cls._vit(768, 12, 12, False, registers)

    @classmethod
    def vit_l14(cls, registers: bool = False) -> "Dinov2Config":
        """facebook/dinov2-large (with registers: facebook/dinov2-with-registers-large)."""
        return cls._vit(1024, 24, 16, False, registers)

    @classmethod
    def vit_g14(cls, registers: bool = False) -> "Dinov2Config":
        """facebook/dinov2-giant (with registers: facebook/dinov2-with-registers-giant), the
        tower AnyDoor uses: SwiGLU FFN (hidden 4096)."""
        return cls._vit(1536, 40, 24, True, registers)

    @classmethod
    def preset(cls, name: str) -> "Dinov2Config":
        """A config by its Hub repo name (`PRESETS`), with or without the 'facebook/' prefix."""
        key = name.removeprefix("facebook/")
        if key not in PRESETS:
            raise KeyError(f"unknown DINOv2 preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[key]()

    # --------------------------------------------------------------------- config.json

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Dinov2Config":
        """From a transformers `Dinov2Config` / `Dinov2WithRegistersConfig` config.json. Keys
        that change the forward pass and are not implemented raise, naming them."""
        model_type = raw.get("model_type")
        if model_type is None:
            archs = raw.get("architectures") or []
            model_type = ("dinov2_with_registers" if archs and "WithRegisters" in archs[0]
                          else "dinov2")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"DINOv2 config: model_type {model_type!r} is not one of {MODEL_TYPES}")
        names = {f.name for f in dataclasses.fields(cls)} - {"model_type"}
        unknown = sorted(k for k in raw if k not in names and k != "model_type"
                         and k not in _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"DINOv2 config: unsupported keys {unknown} (they may change the "
                             "forward pass, which this port does not implement)")
        kw = {**_TYPE_DEFAULTS[model_type], **{k: raw[k] for k in names if k in raw}}
        if model_type == "dinov2_with_registers" and "use_mask_token" in raw:
            raise ValueError("DINOv2 config: use_mask_token is not a Dinov2WithRegistersConfig field")
        for k in ("image_size", "patch_size"):
            if k in kw:
                kw[k] = _square(k, kw[k])
        return cls(model_type=model_type, **kw)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers' `Dinov2Model` / `Dinov2WithRegistersModel` loads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.with_registers:
            del d["use_mask_token"]
        else:
            del d["num_register_tokens"]
        d.update(architectures=[self.architecture], hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, initializer_range=0.02)
        return d


# Hub repo name (under facebook/) -> preset.
PRESETS = {
    **{f"dinov2-{size}": functools.partial(fn, registers=False) for size, fn in (
        ("small", Dinov2Config.vit_s14), ("base", Dinov2Config.vit_b14),
        ("large", Dinov2Config.vit_l14), ("giant", Dinov2Config.vit_g14))},
    **{f"dinov2-with-registers-{size}": functools.partial(fn, registers=True) for size, fn in (
        ("small", Dinov2Config.vit_s14), ("base", Dinov2Config.vit_b14),
        ("large", Dinov2Config.vit_l14), ("giant", Dinov2Config.vit_g14))},
}


class Dinov2Output(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + R + N, D], after the final layernorm (as transformers)
    pooler_output: jax.Array  # [B, D], the layernormed CLS token


# --------------------------------------------------------------------------- position resampling


def _cubic1(x, a):  # the cubic convolution kernel on |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic2(x, a):  # ... on 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """W [n_out, n_in] such that W @ x is torch's `F.interpolate(x, size=n_out, mode='bicubic',
    align_corners=False, antialias=antialias)` along one axis (the 2-D resize is separable).

    antialias=False (Dinov2Model): Keys' cubic with a = -0.75 at source coordinate
    (i + 0.5) * n_in / n_out - 0.5, taps outside the grid clamped to the edge, no widening when
    downsampling. antialias=True (Dinov2WithRegistersModel): a = -0.5, the kernel widened by the
    downscale factor, taps outside the grid dropped and the rest renormalised (PIL's filter).
    Weights are computed in float32 with torch's formulas; they agree with torch's CPU kernel to
    ~2e-6 (its vectorised code rounds the polynomials differently)."""
    f = np.float32
    w = np.zeros((n_out, n_in), f)
    scale = f(n_in) / f(n_out)
    if not antialias:
        a = f(-0.75)
        for i in range(n_out):
            real = scale * (f(i) + f(0.5)) - f(0.5)
            idx = min(int(np.floor(real)), n_in - 1)
            t = min(max(real - f(idx), f(0)), f(1))
            coeffs = (_cubic2(t + f(1), a), _cubic1(t, a), _cubic1(f(1) - t, a),
                      _cubic2(f(2) - t, a))
            for j, c in enumerate(coeffs):
                w[i, min(max(idx + j - 1, 0), n_in - 1)] += c
        return w
    a = f(-0.5)
    support, inv = (f(2) * scale, f(1) / scale) if scale >= 1 else (f(2), f(1))

    def kernel(x):
        x = abs(x)
        return _cubic1(x, a) if x < 1 else (_cubic2(x, a) if x < 2 else f(0))

    for i in range(n_out):
        center = scale * (f(i) + f(0.5))
        lo = max(int(center - support + f(0.5)), 0)
        hi = min(int(center + support + f(0.5)), n_in)
        taps = np.array([kernel((f(j) - center + f(0.5)) * inv) for j in range(lo, hi)], f)
        total = taps.sum(dtype=f)
        w[i, lo:hi] = taps / total if total != 0 else taps
    return w


def interpolate_position_embeddings(patch_pos: jax.Array, height: int, width: int,
                                    antialias: bool) -> jax.Array:
    """[S, S, D] learned patch positions -> [height, width, D], in float32 (transformers
    resamples in float32 whatever the parameter dtype: bicubic in half precision shifts them)."""
    s = patch_pos.shape[0]
    wh = jnp.asarray(bicubic_resize_matrix(s, height, antialias))  # [height, S]
    ww = jnp.asarray(bicubic_resize_matrix(s, width, antialias))  # [width, S]
    x = patch_pos.astype(jnp.float32)
    # torch resamples the width first, then the height
    x = jnp.einsum("jb,abd->ajd", ww, x, precision="highest")  # [S, width, D]
    return jnp.einsum("ia,ajd->ijd", wh, x, precision="highest")  # [height, width, D]


# --------------------------------------------------------------------------- modules


class Dinov2PatchEmbeddings(nnx.Module):
    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype):
        self.dtype = dtype
        self.projection = layers.conv(
            config.num_channels, config.hidden_size, rngs, kernel_size=config.patch_size,
            stride=config.patch_size, padding=0, use_bias=True, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H//p, W//p, D] (the conv drops a ragged remainder, as torch's)."""
        return self.projection(pixel_values.astype(self.dtype))


class Dinov2Embeddings(nnx.Module):
    """CLS token + patch embedding + learned positions (resampled to the input) [+ registers]."""

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = config.hidden_size
        self.config, self.dtype = config, dtype
        normal = lambda shape: jax.random.normal(rngs.params(), shape, param_dtype) * 0.02  # noqa: E731
        self.cls_token = nnx.Param(normal((1, 1, d)), out_sharding=(None, None, ax.EMBED))
        self.mask_token = (nnx.Param(jnp.zeros((1, d), param_dtype), out_sharding=(None, ax.EMBED))
                           if config.use_mask_token else None)
        self.patch_embeddings = Dinov2PatchEmbeddings(config, rngs=rngs, dtype=dtype,
                                                      param_dtype=param_dtype)
        self.position_embeddings = nnx.Param(normal((1, config.num_positions + 1, d)),
                                             out_sharding=(None, ax.VOCAB, ax.EMBED))
        self.register_tokens = (
            nnx.Param(jnp.zeros((1, config.num_register_tokens, d), param_dtype),
                      out_sharding=(None, None, ax.EMBED))
            if config.with_registers else None)

    def position_encoding(self, grid_h: int, grid_w: int, square_input: bool) -> jax.Array:
        """[1, 1 + grid_h * grid_w, D] positions for the input's patch grid (transformers'
        `interpolate_pos_encoding`: the table as is when the input has as many patches as the
        table and is square, else the patch part resampled bicubically)."""
        pos = self.position_embeddings[...]
        n = self.config.num_positions
        if grid_h * grid_w == n and square_input:
            return pos
        s = math.isqrt(n)
        patch = pos[0, 1:].reshape(s, s, -1)  # [S, S, D], row-major grid as torch's
        patch = interpolate_position_embeddings(
            patch, grid_h, grid_w, antialias=self.config.with_registers).astype(pos.dtype)
        return jnp.concatenate([pos[:, :1], patch.reshape(1, grid_h * grid_w, -1)], axis=1)

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        """[B, H, W, C] (+ [B, N] bool) -> [B, 1 + R + N, D]."""
        b, h, w, _ = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # [B, H/p, W/p, D]
        gh, gw, d = patches.shape[1:]
        x = patches.reshape(b, gh * gw, d)  # [B, N, D], row-major as torch's flatten(2)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("DINOv2: bool_masked_pos given but the config has use_mask_token=False")
            x = jnp.where(bool_masked_pos[..., None], self.mask_token[...].astype(self.dtype)[None], x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + N, D]
        x = x + self.position_encoding(gh, gw, h == w).astype(self.dtype)
        if self.register_tokens is not None:
            reg = jnp.broadcast_to(self.register_tokens[...].astype(self.dtype),
                                   (b, self.config.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)  # [B, 1 + R + N, D]
        return x


class Dinov2SelfAttention(nnx.Module):
    """q/k/v projections and the attention core (transformers `attention.attention`)."""

    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype, attention_impl):
        d = config.hidden_size
        kw = dict(use_bias=config.qkv_bias, dtype=dtype, param_dtype=param_dtype)
        self.num_heads, self.head_dim, self.attention_impl = (
            config.num_attention_heads, config.head_dim, attention_impl)
        self.query = layers.linear(d, d, rngs, axes=(ax.EMBED, ax.HEADS), **kw)
        self.key = layers.linear(d, d, rngs, axes=(ax.EMBED, ax.HEADS), **kw)
        self.value = layers.linear(d, d, rngs, axes=(ax.EMBED, ax.HEADS), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D] (heads concatenated, before the output projection)."""
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731  [B, L, H, Dh]
        out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                    impl=self.attention_impl, scale=self.head_dim**-0.5)
        return out.reshape(b, n, d)


class Dinov2SelfOutput(nnx.Module):
    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype):
        d = config.hidden_size
        self.dense = layers.linear(d, d, rngs, axes=(ax.HEADS, ax.EMBED), dtype=dtype,
                                   param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class Dinov2Attention(nnx.Module):
    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype, attention_impl):
        self.attention = Dinov2SelfAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl)
        self.output = Dinov2SelfOutput(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class Dinov2LayerScale(nnx.Module):
    """x * lambda1 (per channel), lambda1 initialised to `layerscale_value`."""

    def __init__(self, config: Dinov2Config, *, dtype, param_dtype):
        self.dtype = dtype
        self.lambda1 = nnx.Param(jnp.full((config.hidden_size,), config.layerscale_value, param_dtype),
                                 out_sharding=(ax.NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(self.dtype)


class Dinov2MLP(nnx.Module):
    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.act = layers.activation(config.hidden_act)
        self.fc1 = layers.linear(config.hidden_size, config.ffn_hidden_size, rngs,
                                 axes=(ax.EMBED, ax.MLP), **kw)
        self.fc2 = layers.linear(config.ffn_hidden_size, config.hidden_size, rngs,
                                 axes=(ax.MLP, ax.EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Dinov2SwiGLUFFN(nnx.Module):
    """weights_out(silu(x1) * x2) with (x1, x2) the two halves of weights_in(x) (ViT-g/14).
    transformers 5 holds the halves as `gate_proj` (x1) and `up_proj` (x2)."""

    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        h = config.ffn_hidden_size
        self.weights_in = layers.linear(config.hidden_size, 2 * h, rngs, axes=(ax.EMBED, ax.MLP), **kw)
        self.weights_out = layers.linear(h, config.hidden_size, rngs, axes=(ax.MLP, ax.EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.weights_in(x), 2, axis=-1)  # torch `.chunk(2, dim=-1)`
        return self.weights_out(jax.nn.silu(x1) * x2)


class Dinov2Layer(nnx.Module):
    """x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))  (drop path: identity at inference)."""

    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype, attention_impl):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = layers.layer_norm(d, rngs, eps=eps, **kw)
        self.attention = Dinov2Attention(config, rngs=rngs, attention_impl=attention_impl, **kw)
        self.layer_scale1 = Dinov2LayerScale(config, **kw)
        self.norm2 = layers.layer_norm(d, rngs, eps=eps, **kw)
        ffn = Dinov2SwiGLUFFN if config.use_swiglu_ffn else Dinov2MLP
        self.mlp = ffn(config, rngs=rngs, **kw)
        self.layer_scale2 = Dinov2LayerScale(config, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


def _run_layer(layer: Dinov2Layer, x: jax.Array) -> jax.Array:
    return layer(x)


class Dinov2Encoder(nnx.Module):
    def __init__(self, config: Dinov2Config, *, rngs, dtype, param_dtype, attention_impl, remat,
                 remat_policy=None):
        self.remat, self.remat_policy = remat, remat_policy
        self.layer = nnx.List([
            Dinov2Layer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                        attention_impl=attention_impl)
            for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        run = layers.maybe_remat(_run_layer, self.remat, self.remat_policy)
        for layer in self.layer:
            x = run(layer, x)
        return x


class _Dinov2Base(PretrainedMixin, nnx.Module):
    """embeddings -> encoder -> layernorm; pooler = the layernormed CLS token."""

    config_class = Dinov2Config
    WEIGHTS_NAMES = ("model", "pytorch_model")
    _MODEL_TYPE = "dinov2"

    def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", remat: bool = False,
                 remat_policy: str | None = None):
        if config.model_type != self._MODEL_TYPE:
            raise ValueError(
                f"{type(self).__name__}: config model_type {config.model_type!r}; this class is "
                f"{self._MODEL_TYPE!r} (use {_ARCHITECTURES[config.model_type]}, or "
                "dinov2_from_pretrained / dinov2_class to pick the class from the config)")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.embeddings = Dinov2Embeddings(config, rngs=rngs, **kw)
        self.encoder = Dinov2Encoder(config, rngs=rngs, attention_impl=attention_impl, remat=remat,
                                     remat_policy=remat_policy, **kw)
        self.layernorm = layers.layer_norm(config.hidden_size, rngs, eps=config.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None = None
                 ) -> Dinov2Output:
        """pixel_values [B, H, W, C] (DINOv2-normalised; H, W >= patch_size) -> last_hidden_state
        [B, 1 + R + N, D] (CLS, R registers, N = (H//p)(W//p) patches row-major), pooler_output
        [B, D]. `bool_masked_pos` [B, N] replaces those patches by the mask token."""
        c, p = self.config.num_channels, self.config.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != c or min(pixel_values.shape[1:3]) < p:
            raise ValueError(f"DINOv2: pixel_values {pixel_values.shape}, expected [B, H, W, {c}] "
                             f"(NHWC) with H, W >= patch_size {p}")
        x = self.encoder(self.embeddings(pixel_values, bool_masked_pos))
        x = self.layernorm(x)
        return Dinov2Output(last_hidden_state=x, pooler_output=x[:, 0])

    def class_and_patch_tokens(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 1 + N, D]: `last_hidden_state` without the register tokens (the
        ID tokens of AnyDoor: class + patches)."""
        return drop_registers(self(pixel_values).last_hidden_state, self.config.num_register_tokens)

    @classmethod
    def rename_legacy_keys(cls, state_dict):
        """transformers 5's in-memory names (`model.state_dict()`) -> the checkpoint names."""
        return checkpoint_state_dict(state_dict)

    @classmethod
    def from_config_and_state_dict(cls, config, state_dict, **kw):
        return super().from_config_and_state_dict(config, cls.rename_legacy_keys(dict(state_dict)), **kw)


@register("transformers")
class Dinov2Model(_Dinov2Base):
    """transformers `Dinov2Model` (facebook/dinov2-{small,base,large,giant})."""


@register("transformers")
class Dinov2WithRegistersModel(_Dinov2Base):
    """transformers `Dinov2WithRegistersModel` (facebook/dinov2-with-registers-*): R register
    tokens after CLS, and the positions resampled with antialiasing."""

    _MODEL_TYPE = "dinov2_with_registers"


def drop_registers(tokens: jax.Array, num_register_tokens: int) -> jax.Array:
    """[B, 1 + R + N, D] -> [B, 1 + N, D] (CLS + patches)."""
    if not num_register_tokens:
        return tokens
    return jnp.concatenate([tokens[:, :1], tokens[:, 1 + num_register_tokens:]], axis=1)


def dinov2_class(config: Dinov2Config) -> type[_Dinov2Base]:
    return Dinov2WithRegistersModel if config.with_registers else Dinov2Model


def dinov2_from_pretrained(path: str, **kw) -> _Dinov2Base:
    """Either DINOv2 class, as the folder / Hub id's config.json says (`model_type`). `kw` as
    `PretrainedMixin.from_pretrained` (subfolder, Hub options, dtype, remat, ...)."""
    hub = {k: kw[k] for k in ("subfolder", "revision", "cache_dir", "local_files_only", "token",
                              "force_download", "use_safetensors", "variant") if k in kw}
    config = Dinov2Model.load_config(path, **hub)
    return dinov2_class(config).from_pretrained(path, **kw)


# --------------------------------------------------------------------------- key names

# transformers 5 in-memory spelling -> checkpoint spelling (what the Hub and save_pretrained hold).
_RENAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
)


def checkpoint_state_dict(state_dict: dict) -> dict:
    """A transformers-5 in-memory DINOv2 state dict in the checkpoint spelling: renamed
    attention keys, and `mlp.gate_proj` / `mlp.up_proj` joined into `mlp.weights_in` (gate
    first, along the output axis). Keys already in the checkpoint spelling pass unchanged; a
    gate without its up (or the reverse) is left as is, for the strict load to name."""
    out = {}
    for k, v in state_dict.items():
        for old, new in _RENAMES:
            if old in k:
                k = k.replace(old, new)
                break
        out[k] = v
    for gate in [k for k in out if ".mlp.gate_proj." in k]:
        up = gate.replace(".mlp.gate_proj.", ".mlp.up_proj.")
        if up in out:
            joined = np.concatenate([np.asarray(out.pop(gate)), np.asarray(out.pop(up))], axis=0)
            out[gate.replace(".mlp.gate_proj.", ".mlp.weights_in.")] = joined
    return out
