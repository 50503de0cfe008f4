"""The first hour without traps (issue 32): a whole-photo edit the model cannot make in
reasonable memory is refused at once (the guard comes from the model's latent size), and the
first edit says that it compiles."""
import logging
import time

import numpy as np
import pytest

from pbe_jax.configs.pbe import demo_models
from pbe_jax.inference import MAX_PIXELS, max_pixels_for
from pbe_jax.models.abstract import eval_shape
from pbe_jax.pipeline import PaintByExample
from pbe_jax.schedulers import pbe_scheduler_config


@pytest.fixture(scope="module")
def demo_pipe():
    """The demo's architecture (2x VAE, attention on 16 x 16 latents), abstract params: the
    guard runs before any compute."""
    return eval_shape(lambda: PaintByExample.from_model_config(
        {**demo_models().to_dict(), "scheduler": pbe_scheduler_config()}))


def test_memory_guard_from_the_latent_size(demo_pipe):
    assert max_pixels_for(demo_pipe) == 192 * 192  # the demo's attention at SD's 768 x 768 token count
    sd = {"vae": {"block_out_channels": (128, 256, 512, 512)},
          "unet": {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)}}

    class Cfg:
        def __init__(self, d):
            self.__dict__.update(d)

    class SD:
        vae = Cfg({"config": Cfg(sd["vae"])})
        unet = Cfg({"config": Cfg(sd["unet"])})
    assert max_pixels_for(SD) == MAX_PIXELS  # SD v1 keeps its 768 x 768


def test_demo_model_refuses_a_300x200_whole_photo_within_a_second(demo_pipe):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[80:120, 100:160] = 255
    ref = rng.integers(0, 256, (64, 64, 3), np.uint8)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"300x200 .* over max_pixels=36,864 \(this model's limit.*mask_crop_padding"):
        demo_pipe(src, mask, ref, num_inference_steps=2)
    assert time.perf_counter() - t0 < 1.0
