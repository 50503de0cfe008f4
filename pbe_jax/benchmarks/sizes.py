"""The model sizes the benchmarks run at, defined once: `tiny` (smoke), `small` (seconds per
step on a CPU) and `sd15` (the released SD-1.x Paint-by-Example architecture at 512 px).

`bench_config(size, ...)` gives a full training config (configs/pbe.py) with that model, image
side, batch and dtype, so our side and the PyTorch reference read the same numbers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pbe_jax.configs import load_config
from pbe_jax.configs.pbe import demo_models, sd15_models
from pbe_jax.schedulers import pbe_scheduler_config

SIZES = ("tiny", "small", "sd15")

# small: a mid-size SD-shaped model: an 8x VAE, a 3-level UNet (64, 128, 128) with cross
# attention on the two upper levels, a 6-layer CLIP tower (one mapper block).
_SMALL_MODELS: dict[str, Any] = {
    "unet": {
        "in_channels": 9, "out_channels": 4, "sample_size": 16,
        "block_out_channels": (64, 128, 128), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8, "cross_attention_dim": 256, "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 128,
        "block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "norm_num_groups": 32,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
    },
    "image_encoder": {
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
        "num_attention_heads": 4, "image_size": 112, "patch_size": 14, "projection_dim": 256,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "proj_size": 256,
    },
}


_TINY_VAE = {"sample_size": 64, "block_out_channels": (16, 32, 32),
             "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
             "scaling_factor": 5.3}  # random VAE: latents scaled to ~unit variance


@dataclass(frozen=True)
class Size:
    """models: {'unet','vae','image_encoder'} config.json dicts; resolution: image side in px;
    train_batch: global batch of the train bench; sample_batch: images per sampling call."""
    name: str
    models: dict
    resolution: int
    train_batch: int
    sample_batch: int = 4


def get_size(name: str) -> Size:
    if name == "tiny":
        # The demo's UNet and CLIP tower with a 3-level VAE (factor 4: 64 px images, as the demo
        # had before it fitted its own 2-level VAE at 32 px); the paper's schedule (bench_config)
        # instead of the demo's x0-predicting DDIM.
        models = {k: v for k, v in demo_models().to_dict().items() if k != "scheduler"}
        models["vae"].update(_TINY_VAE)
        return Size("tiny", models, resolution=64, train_batch=2)
    if name == "small":
        return Size("small", copy.deepcopy(_SMALL_MODELS), resolution=128, train_batch=4)
    if name == "sd15":
        models = sd15_models().to_dict()
        return Size("sd15", models, resolution=512, train_batch=1)
    raise ValueError(f"unknown size {name!r}; known: {SIZES}")


def bench_config(size: Size, *, dtype: str = "fp32", batch: int | None = None, mesh: str = "data:-1",
                 remat: bool = False):
    """A locked training config (configs/pbe.py 'demo' with `size`'s model): random init, no EMA,
    the official optimiser (AdamW, wd 0.01, CFG drop 0.2 per batch), no warm-up, the paper's
    noise schedule (PLMS, eps) and frozen CLIP tower."""
    c = load_config("pbe:demo")
    with c.unlocked():
        c.model = {"scheduler": pbe_scheduler_config(), **size.models}
    c.train.train_image_tower = False
    c.dtype = dtype
    c.mesh = mesh
    c.remat = remat
    c.train.batch_size = batch or size.train_batch
    c.train.lr = 1e-5
    c.train.warmup_steps = 0
    c.data.resolution = size.resolution
    c.data.reference_size = size.models["image_encoder"]["image_size"]
    return c
