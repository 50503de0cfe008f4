"""Flax NNX ports of the Paint-by-Example networks (NHWC; parameter names as diffusers /
transformers), the pipeline container, and the class registry.

    from pbe_jax.models import UNet2DConditionModel, AutoencoderKL, CLIPVisionModel
    unet = UNet2DConditionModel.from_pretrained("Fantasy-Studio/Paint-by-Example", subfolder="unet")
"""
from pbe_jax.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from pbe_jax.models.conditioner import (
    PaintByExampleEncoderConfig,
    PaintByExampleImageEncoder,
    PaintByExampleTokenEncoder,
)
from pbe_jax.models.dinov2 import Dinov2Config, Dinov2Model, Dinov2WithRegistersModel
from pbe_jax.models.dinov2_encoder import Dinov2EncoderConfig, Dinov2ImageEncoder
from pbe_jax.models.exemplar import CONDITIONERS, ExemplarEncoder, conditioner_class
from pbe_jax.models.paint_by_example import FROZEN, TRAINABLE, PaintByExampleModel
from pbe_jax.models.registry import COMPONENTS, model_class, register, slot_class
from pbe_jax.models.unet import UNet2DConditionModel, UNetConfig
from pbe_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIP_MEAN", "CLIP_STD", "CLIPVisionConfig", "CLIPVisionModel", "CONDITIONERS",
    "CLIPVisionModelWithProjection", "COMPONENTS", "Dinov2Config", "Dinov2EncoderConfig",
    "Dinov2ImageEncoder", "Dinov2Model", "Dinov2WithRegistersModel", "ExemplarEncoder", "FROZEN",
    "PaintByExampleEncoderConfig", "PaintByExampleTokenEncoder", "conditioner_class",
    "PaintByExampleImageEncoder", "PaintByExampleModel", "TRAINABLE", "UNet2DConditionModel",
    "UNetConfig", "VAEConfig", "model_class", "register", "slot_class",
]
