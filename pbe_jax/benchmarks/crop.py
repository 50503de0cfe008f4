"""Crop-around-the-mask benchmark: one edit of a large photo with a small mask, edited whole
(the source padded to the model's factor and run at full size) vs in a window around the mask
at the model's resolution (`edit(..., mask_crop_padding=N)`), same model, steps and seed.

Both paths are compiled ahead of time first, for XLA's estimate of their FLOPs and temporary
memory; the full-size edit is timed only when that memory fits in half of this machine's RAM
(self-attention over the latent grid of a 1600x1200 photo needs far more than a CPU box has, which
is one reason to crop), otherwise its row shows '-' for the time.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from pbe_jax.benchmarks import model as bm
from pbe_jax.benchmarks.report import Row, median_seconds
from pbe_jax.inference import crop_inputs, edit, edit_function, prepare
from pbe_jax.schedulers import scheduler_for


def inputs(width: int, height: int, box: int, seed: int = 0):
    """uint8 source [H, W, 3] (smooth random colours), bool mask [H, W] with a `box`-px square
    to edit a third of the way in, uint8 reference [224, 224, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
    src = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)  # smooth, photo-like
    mask = np.zeros((height, width), bool)
    top, left = height // 3, width // 3
    mask[top:top + box, left:left + box] = True
    ref = rng.integers(0, 256, (224, 224, 3), np.uint8)
    return src.astype(np.uint8), mask, ref


def compiled_stats(model, image, mask, ref, *, steps: int, guidance: float, padding: int | None
                   ) -> tuple[tuple[int, ...], float, float]:
    """(shape of the image batch the jitted edit takes, XLA FLOPs estimate, temporary bytes) of
    the edit `edit()` runs for these inputs, compiled without running."""
    images, edits = [image], [mask]
    if padding is not None:
        _, images, edits = crop_inputs(model, images, edits, padding)
    x = prepare(model, images, edits, [ref], [0])
    sched = scheduler_for(model.scheduler_config, "plms", steps)
    fn, state, _ = edit_function(model, scheduler=sched, cfg=guidance != 1.0)
    compiled = fn.lower(state, x.image, x.keep, x.ref, x.seeds, np.float32(guidance)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return x.image.shape, float(cost.get("flops", float("nan"))), float(mem.temp_size_in_bytes)


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(size, *, source: tuple[int, int] = (1200, 1600), box: int | None = None, padding: int = 32,
        steps: int = 50, guidance: float = 5.0, reps: int = 3, warmup: int = 1, full: bool = True,
        dtype: str = "fp32") -> list[Row]:
    """Rows `crop/<size>/<W>x<H>/...`: ours = the mask-crop edit, reference = the full-size edit.
    `source` is (H, W); `box` the mask's side (default: half the model's resolution)."""
    _, _, _, model = bm.build(size, dtype=dtype)
    h, w = source
    box = box or size.resolution // 2
    image, mask, ref = inputs(w, h, box)
    crop_shape, crop_flops, crop_mem = compiled_stats(model, image, mask, ref, steps=steps,
                                                      guidance=guidance, padding=padding)
    full_shape, full_flops, full_mem = compiled_stats(model, image, mask, ref, steps=steps,
                                                      guidance=guidance, padding=None)

    def call(pad):
        def f():
            out = edit(model, image, mask, ref, num_inference_steps=steps, guidance_scale=guidance,
                       mask_crop_padding=pad, output_type="np")
            assert out.shape == (1, h, w, 3)
        return f

    crop_s, _ = median_seconds(call(padding), reps=reps, warmup=warmup)
    full_s = None
    if full and full_mem < _ram_bytes() / 2:
        full_s, _ = median_seconds(call(None), reps=reps, warmup=warmup)
    name = f"crop/{size.name}/{w}x{h}"
    tag = f"{steps}-step PLMS, {box}-px mask, padding {padding}"
    return [
        Row(f"{name}/call_time", crop_s, full_s, f"s per edit ({tag}; reference: whole image)"),
        Row(f"{name}/edit_pixels", crop_shape[1] * crop_shape[2], full_shape[1] * full_shape[2],
            "pixels through the VAE / UNet"),
        Row(f"{name}/flops", crop_flops, full_flops, "FLOP (XLA estimate, sampler loop body once)"),
        Row(f"{name}/temp_memory", crop_mem / 2**20, full_mem / 2**20, "MiB (XLA, compiled)"),
    ]
