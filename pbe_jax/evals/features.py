"""Feature extractors for the metrics: Inception pool3 (standard FID) and CLIP image embeddings
(the features the Paint-by-Example authors' FID and QS scripts actually use)."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

from pbe_jax.evals.extract import FeatureExtractor
from pbe_jax.evals.inception import InceptionV3, inception_inputs
from pbe_jax.models.clip import clip_preprocess


def _inception_pool3(model: InceptionV3, images: jax.Array, *, style: str) -> jax.Array:
    return model(inception_inputs(images, style))


def inception_extractor(
    model: InceptionV3,
    *,
    style: str = "pytorch_fid",
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> FeatureExtractor:
    """Images `[B, H, W, 3]` (uint8, or float in [0, 1]) -> pool3 `[B, 2048]`; resize and scaling
    follow `style` ('pytorch_fid' or 'torch_fidelity', see `inception_inputs`)."""
    return FeatureExtractor(model, functools.partial(_inception_pool3, style=style), mesh=mesh,
                            batch_axes=batch_axes, batch_size=batch_size)


def _clip_image_embeds(model: nnx.Module, images: jax.Array) -> jax.Array:
    size = model.config.image_size
    return model(clip_preprocess(images, size=size, mode="squash")).image_embeds


def clip_extractor(
    model: nnx.Module,
    *,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> FeatureExtractor:
    """Images `[B, S, S, 3]` (uint8, or float in [0, 1]) at the model's `image_size` S (224 for
    ViT-B/32), already resized on the host the way the reference script does (e.g.
    `images.clip_pil_resize_crop`) -> `image_embeds` `[B, P]` of a
    `pbe_jax.models.clip.CLIPVisionModelWithProjection` (= OpenAI CLIP `encode_image`: the
    projected post-LayerNorm class token, not L2-normalised). CLIP normalisation happens here
    (`clip_preprocess`, whose resize is the identity at size S; other sizes are squashed with
    its JAX bicubic, which is close to but not PIL's)."""
    return FeatureExtractor(model, _clip_image_embeds, mesh=mesh, batch_axes=batch_axes, batch_size=batch_size)
