"""Sampling benchmark: 50-step PLMS with guidance 5 on a batch of 4 edits, pbe_jax
(`PaintByExample.__call__`: one jitted encode / `lax.scan` sampler / decode) vs diffusers'
`PaintByExamplePipeline` loaded from our `save_pretrained` export (identical weights, PNDM with
skip_prk_steps = PLMS). Both take the same PIL images and return float arrays, so host
preprocessing is timed on both sides.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
from PIL import Image

from pbe_jax.benchmarks import model as bm
from pbe_jax.benchmarks import torch_ref
from pbe_jax.benchmarks.report import Row, device_peak_bytes, median_seconds, torch_peak_bytes
from pbe_jax.inference import edit


def inputs(n: int, resolution: int, seed: int = 0):
    """n (source, mask, reference) PIL images; the mask is white (= edit) in a box."""

    rng = np.random.default_rng(seed)
    src, masks, refs = [], [], []
    for _ in range(n):
        src.append(Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), np.uint8)))
        m = np.zeros((resolution, resolution), np.uint8)
        x0, y0 = rng.integers(0, resolution // 2, 2)
        m[y0:y0 + resolution // 3, x0:x0 + resolution // 3] = 255
        masks.append(Image.fromarray(m))
        refs.append(Image.fromarray(rng.integers(0, 256, (resolution // 2, resolution // 2, 3), np.uint8)))
    return src, masks, refs


def run(size, *, dtype: str = "fp32", reps: int = 3, warmup: int = 1, steps: int = 50,
        guidance: float = 5.0, batch: int | None = None, reference: bool = True,
        attention_impl: str | None = None, torch_compile: bool = False) -> list[Row]:
    """`torch_compile`: also time diffusers with `torch.compile` on its UNet (a row
    `images_per_s_vs_torch_compile`). Peak device memory rows appear on an accelerator only."""

    n = batch or size.sample_batch
    src, masks, refs = inputs(n, size.resolution)
    name = f"sample/{size.name}"
    with tempfile.TemporaryDirectory(prefix="pbe_bench_") as export:
        _, _, _, model = bm.build(size, dtype=dtype, export_dir=export if reference else None,
                                  attention_impl=attention_impl)

        def ours():
            out = edit(model, src, masks, refs, num_inference_steps=steps, guidance_scale=guidance,
                        scheduler="plms", output_type="np")
            assert out.shape[0] == n

        t0 = time.perf_counter()
        ours()  # compile (encode, sampler scan, decode) + the first call
        first_s = time.perf_counter() - t0
        ours_s, _ = median_seconds(ours, reps=reps, warmup=max(warmup - 1, 0))
        ours_peak = device_peak_bytes()
        del model
        ref_s = compiled_ref_s = ref_peak = None
        if reference:
            import torch

            dev = torch_ref.torch_device()
            pipe = torch_ref.load_pipeline(export, dev)
            if dtype == "bf16":
                pipe = pipe.to(dtype=torch.bfloat16)

            def theirs():
                out = pipe(example_image=refs, image=src, mask_image=masks, num_inference_steps=steps,
                           guidance_scale=guidance, output_type="np",
                           generator=torch.Generator(dev).manual_seed(0)).images
                assert out.shape[0] == n

            torch_peak_bytes(dev, reset=True)
            ref_s, _ = median_seconds(theirs, reps=reps, warmup=warmup)
            ref_peak = torch_peak_bytes(dev)
            if torch_compile:
                pipe.unet = torch.compile(pipe.unet)
                compiled_ref_s, _ = median_seconds(theirs, reps=reps, warmup=max(warmup, 1))
    tag = f"{steps}-step PLMS, cfg {guidance:g}, batch {n}, {size.resolution} px"
    rows = [
        Row(f"{name}/images_per_s", n / ours_s, None if ref_s is None else n / ref_s, f"images/s ({tag})"),
        Row(f"{name}/call_time", ours_s, ref_s, "s"),
        Row(f"{name}/first_call_time", first_s, None, "s (compile + one call)"),
    ]
    if compiled_ref_s is not None:
        rows.append(Row(f"{name}/images_per_s_vs_torch_compile", n / ours_s, n / compiled_ref_s,
                        f"images/s ({tag}; reference: torch.compile UNet)"))
    if ours_peak is not None:
        rows.append(Row(f"{name}/peak_device_memory", ours_peak, ref_peak, "bytes"))
    return rows
