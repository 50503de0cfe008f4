"""The Paint-by-Example conditioning encoder (diffusers `PaintByExampleImageEncoder`) in NNX.

    pixel_values [B, 224, 224, 3] -> CLIP ViT-L/14 `pooler_output` [B, 1024]      (frozen)
        -> [:, None] -> mapper (5 x BasicTransformerBlock, 1 head) -> final_layer_norm
        -> proj_out (1024 -> 768) -> context [B, 1, 768]                          (trainable)

plus `uncond_vector` [1, 1, 768], the learned classifier-free-guidance context (trainable). See
PBE_SPEC.md 1.3 (official `FrozenCLIPImageEmbedder` + `xf.Transformer`) and 5.1 (diffusers).

The encoder follows the exemplar-encoder contract (models/exemplar.py): `tower` (the frozen CLIP
part; `clip_pooled` is its pooled vector), `project` (the trainable part), `uncond`; which params
train is the contract's `FROZEN_PARTS` (the official `configure_optimizers` list, PBE_SPEC 1.2).
It is the `clip` conditioner (configs/pbe.py `conditioner=clip`, the default);
`PaintByExampleTokenEncoder` (`conditioner=clip_tokens`) feeds every CLIP token (class + patches,
after the tower's post-LayerNorm) through the same mapper: a wider context, same tower and params.

Parameter paths mirror diffusers' keys: `model.vision_model.*` (the CLIP tower, in the spelling of
the released checkpoint; diffusers with transformers 5 saves `model.embeddings.*` and we read
both), `mapper.blocks.<i>.{norm1, attn1.{to_q,to_k,to_v,to_out.0}, norm3, ff.net.{0.proj,2}}`,
`final_layer_norm`, `proj_out`, `uncond_vector`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import axes as ax
from pbe_jax.models import layers
from pbe_jax.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, CLIPVisionModel
from pbe_jax.models.exemplar import ExemplarEncoder, ReferencePreprocess, register_conditioner
from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.registry import register
from pbe_jax.models.transformer import BasicTransformerBlock


def trainable_filter():
    """An NNX filter for the CLIP encoder's trainable params (mapper, final LN, proj_out,
    uncond_vector): `nnx.state(encoder, trainable_filter())`. Other conditioners: ask the class,
    `type(encoder).trainable_filter()`."""
    return PaintByExampleImageEncoder.trainable_filter()


@dataclasses.dataclass(frozen=True)
class PaintByExampleEncoderConfig:
    """The CLIP vision config of the tower plus `proj_size`, the context width.

    The config.json is a plain CLIPVisionConfig one. diffusers builds the encoder with
    `proj_size or getattr(config, "projection_dim", 768)` and `from_pretrained` passes no
    `proj_size`, so the json carries `proj_size` as `projection_dim` (whose CLIP default, when
    the key is absent, is 512); `to_dict` writes it there.
    """

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig.vit_l14)
    proj_size: int = 768

    ARCHITECTURE = "PaintByExampleImageEncoder"  # config.json's architectures (the class)

    @property
    def hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def num_mapper_blocks(self) -> int:
        """diffusers `PaintByExampleMapper`: (num_hidden_layers + 1) // 5 (5 for ViT-L/14)."""
        return (self.vision.num_hidden_layers + 1) // 5

    @classmethod
    def paint_by_example(cls):
        """The released model (Fantasy-Studio/Paint-by-Example `image_encoder`)."""
        return cls(vision=CLIPVisionConfig.vit_l14(), proj_size=768)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]):
        raw = dict(raw)
        proj_size = raw.get("projection_dim", CLIPVisionConfig.projection_dim)
        if "proj_size" in raw:  # not read by diffusers; accept it only when it agrees
            if raw["proj_size"] != proj_size:
                raise ValueError(f"PaintByExample encoder config: proj_size {raw['proj_size']} != "
                                 f"projection_dim {proj_size} (diffusers uses projection_dim)")
            del raw["proj_size"]
        return cls(vision=CLIPVisionConfig.from_dict(raw), proj_size=int(proj_size))

    def to_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' `PaintByExampleImageEncoder.from_pretrained` loads."""
        d = self.vision.to_dict()
        d.update(projection_dim=self.proj_size, architectures=[self.ARCHITECTURE])
        return d


@dataclasses.dataclass(frozen=True)
class PaintByExampleTokenEncoderConfig(PaintByExampleEncoderConfig):
    """The same fields; config.json names `PaintByExampleTokenEncoder` (pbe_jax's class)."""

    ARCHITECTURE = "PaintByExampleTokenEncoder"


def _run_block(block: BasicTransformerBlock, x: jax.Array) -> jax.Array:
    return block(x)


class PaintByExampleMapper(nnx.Module):
    """`blocks`: (layers + 1) // 5 self-attention-only BasicTransformerBlocks, 1 head of width
    `hidden`, GELU feed-forward, biased q/k/v. [B, 1, D] -> [B, 1, D].

    With one token, softmax is exactly 1 and attention reduces to to_out(to_v(norm1(x)))
    (PBE_SPEC 1.3); `Attention` takes that shortcut itself."""

    def __init__(self, config: PaintByExampleEncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype,
                 attention_impl: str, remat: bool):
        d = config.hidden_size
        self.remat = remat
        self.blocks = nnx.List([
            BasicTransformerBlock(d, 1, d, activation_fn="gelu", attention_bias=True, rngs=rngs,
                                  dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
            for _ in range(config.num_mapper_blocks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        run = layers.maybe_remat(_run_block, self.remat)
        for block in self.blocks:
            x = run(block, x)
        return x


# "paint_by_example": the library name the released model_index.json gives it.
@register("paint_by_example")
@register_conditioner("clip")
class PaintByExampleImageEncoder(ExemplarEncoder, PretrainedMixin, nnx.Module):
    """diffusers `PaintByExampleImageEncoder`: reference image -> one context token."""

    config_class = PaintByExampleEncoderConfig
    FROZEN_PARTS = ("model",)  # the CLIP tower; mapper, final LN, proj_out, uncond_vector train
    DIFFUSERS_COMPATIBLE = True
    TOWER_CLASS = CLIPVisionModel
    # diffusers' encoder is a transformers PreTrainedModel: save_pretrained writes
    # `model.safetensors`; older exports have `pytorch_model.bin`.
    WEIGHTS_NAMES = ("model", "diffusion_pytorch_model", "pytorch_model")
    IGNORE_KEYS = ("model.vision_model.embeddings.position_ids",)
    _FLAT_PREFIXES = tuple("model." + p for p in CLIPVisionModel._FLAT_PREFIXES)

    def __init__(self, config: PaintByExampleEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", remat: bool = False):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d, p = config.hidden_size, config.proj_size
        self.model = CLIPVisionModel(config.vision, rngs=rngs, attention_impl=attention_impl,
                                     remat=remat, **kw)
        self.mapper = PaintByExampleMapper(config, rngs=rngs, attention_impl=attention_impl,
                                           remat=remat, **kw)
        # torch nn.LayerNorm(hidden) default eps 1e-5, not the CLIP config's layer_norm_eps.
        self.final_layer_norm = layers.layer_norm(d, rngs, eps=1e-5, **kw)
        self.proj_out = layers.linear(d, p, rngs, axes=(ax.EMBED, ax.MLP), **kw)
        self.uncond_vector = nnx.Param(jax.random.normal(rngs.params(), (1, 1, p), param_dtype),
                                       out_sharding=(None, None, ax.EMBED))
        self.set_preprocess(None)

    @classmethod
    def default_preprocess(cls, config) -> ReferencePreprocess:
        """The released model's CLIPImageProcessor, at the tower's size."""
        size = config.vision.image_size
        return ReferencePreprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=size)

    @classmethod
    def with_tower(cls, tower_config: CLIPVisionConfig, proj_size: int, expected=None):
        return cls.config_class(vision=tower_config, proj_size=proj_size)

    @classmethod
    def config_entry(cls, base: dict, proj_size: int) -> dict:
        """`config.model.image_encoder` of this conditioner from a CLIP tower's fields `base`
        (configs/pbe.py TOWERS): `proj_size` is written as `projection_dim` too (diffusers reads
        the encoder's proj_size from there)."""
        entry = {**base, "projection_dim": proj_size, "proj_size": proj_size}
        if cls.config_class.ARCHITECTURE != PaintByExampleEncoderConfig.ARCHITECTURE:
            entry["architectures"] = (cls.config_class.ARCHITECTURE,)
        return entry

    @classmethod
    def rename_legacy_keys(cls, state_dict):
        """diffusers + transformers 5 save the tower as `model.embeddings.*` (no `vision_model.`)."""
        return {("model.vision_model." + k[len("model."):] if k.startswith(cls._FLAT_PREFIXES) else k): v
                for k, v in state_dict.items()}

    def clip_pooled(self, pixel_values: jax.Array) -> jax.Array:
        """The frozen part: pixel_values [B, H, W, 3] (CLIP-normalised) -> pooler_output [B, D].

        Gradients stop here: Paint by Example never trains the tower (PBE_SPEC 1.3)."""
        return jax.lax.stop_gradient(self.model(pixel_values).pooler_output)

    def tower(self, pixel_values: jax.Array) -> jax.Array:
        """The frozen part of the contract: normalised pixels -> tokens [B, 1, D] (pooled)."""
        return self.clip_pooled(pixel_values)[:, None]

    def project(self, tokens: jax.Array) -> jax.Array:
        """The trainable part: tokens [B, N, D] (or pooled [B, D]) -> context [B, N, proj_size]."""
        x = tokens.astype(self.dtype)
        if x.ndim == 2:
            x = x[:, None]  # [B, 1, D]
        return self.proj_out(self.final_layer_norm(self.mapper(x)))

    def uncond(self, dtype=None) -> jax.Array:
        """The learned unconditional context [1, 1, proj_size]."""
        return self.uncond_vector[...].astype(dtype or self.dtype)

    def __call__(self, pixel_values: jax.Array, return_uncond_vector: bool = False):
        """pixel_values [B, H, W, 3] -> context [B, 1, proj_size]; with `return_uncond_vector`
        also `uncond_vector` [1, 1, proj_size], as diffusers returns them."""
        embeds = self.project(self.clip_pooled(pixel_values))
        if return_uncond_vector:
            return embeds, self.uncond(embeds.dtype)
        return embeds


@register("pbe_jax")
@register_conditioner("clip_tokens")
class PaintByExampleTokenEncoder(PaintByExampleImageEncoder):
    """`clip_tokens`: every CLIP token (class + patches, post-LayerNorm) through the mapper:
    [B, 1 + P, D] -> context [B, 1 + P, proj_size]; `uncond_vector` [1, 1, proj_size] is
    broadcast over the tokens. The params are the `clip` encoder's, so a CLIP PbE checkpoint
    initialises it; diffusers' pipeline cannot run it (its encoder returns one token)."""

    config_class = PaintByExampleTokenEncoderConfig
    DIFFUSERS_COMPATIBLE = False

    def tower(self, pixel_values: jax.Array) -> jax.Array:
        """Normalised pixels -> post_layernorm(last_hidden_state) [B, 1 + P, D] (its class
        token is `pooler_output`)."""
        vm = self.model.vision_model
        return jax.lax.stop_gradient(vm.post_layernorm(self.model(pixel_values).last_hidden_state))

    def __call__(self, pixel_values: jax.Array, return_uncond_vector: bool = False):
        embeds = self.project(self.tower(pixel_values))
        if return_uncond_vector:
            return embeds, self.uncond(embeds.dtype)
        return embeds
