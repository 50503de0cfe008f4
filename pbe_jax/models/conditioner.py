"""The Paint-by-Example conditioning encoder (diffusers `PaintByExampleImageEncoder`) in NNX.

    pixel_values [B, 224, 224, 3] -> CLIP ViT-L/14 `pooler_output` [B, 1024]      (frozen)
        -> [:, None] -> mapper (5 x BasicTransformerBlock, 1 head) -> final_layer_norm
        -> proj_out (1024 -> 768) -> context [B, 1, 768]                          (trainable)

plus `uncond_vector` [1, 1, 768], the learned classifier-free-guidance context (trainable). See
PBE_SPEC.md 1.3 (official `FrozenCLIPImageEmbedder` + `xf.Transformer`) and 5.1 (diffusers).

The encoder is split in two so that training can treat the frozen tower as an input to the step:
`clip_pooled` (frozen CLIP part) and `project` (the trainable part); `TRAINED_PARTS` names the
trainable top-level attributes (the official `configure_optimizers` list, PBE_SPEC 1.2).

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
from pbe_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from pbe_jax.models.hub import PretrainedMixin
from pbe_jax.models.registry import register
from pbe_jax.models.transformer import BasicTransformerBlock

# Top-level attributes that Paint by Example trains; `model` (the CLIP tower) stays frozen.
TRAINED_PARTS = ("mapper", "final_layer_norm", "proj_out", "uncond_vector")


def trainable_filter():
    """An NNX filter for the trainable params: `nnx.state(encoder, trainable_filter())`."""
    return nnx.All(nnx.Param, lambda path, _: bool(path) and str(path[0]) in TRAINED_PARTS)


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

    @property
    def hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def num_mapper_blocks(self) -> int:
        """diffusers `PaintByExampleMapper`: (num_hidden_layers + 1) // 5 (5 for ViT-L/14)."""
        return (self.vision.num_hidden_layers + 1) // 5

    @classmethod
    def paint_by_example(cls) -> "PaintByExampleEncoderConfig":
        """The released model (Fantasy-Studio/Paint-by-Example `image_encoder`)."""
        return cls(vision=CLIPVisionConfig.vit_l14(), proj_size=768)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PaintByExampleEncoderConfig":
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
        d.update(projection_dim=self.proj_size, architectures=["PaintByExampleImageEncoder"])
        return d


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
class PaintByExampleImageEncoder(PretrainedMixin, nnx.Module):
    """diffusers `PaintByExampleImageEncoder`: reference image -> one context token."""

    config_class = PaintByExampleEncoderConfig
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

    @classmethod
    def rename_legacy_keys(cls, state_dict):
        """diffusers + transformers 5 save the tower as `model.embeddings.*` (no `vision_model.`)."""
        return {("model.vision_model." + k[len("model."):] if k.startswith(cls._FLAT_PREFIXES) else k): v
                for k, v in state_dict.items()}

    def clip_pooled(self, pixel_values: jax.Array) -> jax.Array:
        """The frozen part: pixel_values [B, H, W, 3] (CLIP-normalised) -> pooler_output [B, D].

        Gradients stop here: Paint by Example never trains the tower (PBE_SPEC 1.3)."""
        return jax.lax.stop_gradient(self.model(pixel_values).pooler_output)

    def project(self, pooled: jax.Array) -> jax.Array:
        """The trainable part: pooled [B, D] -> context [B, 1, proj_size]."""
        x = pooled.astype(self.dtype)[:, None]  # [B, 1, D]
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
