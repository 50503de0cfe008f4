"""Train-step benchmark: the full PbE step (2 VAE encodes, CLIP encode, UNet fwd+bwd, AdamW) of
pbe_jax (`train.Setup(...).jit_step()`, AOT-compiled) vs the eager PyTorch step of
`torch_ref.TorchTrainStep`, same weights, batch and resolution, in one process.

Reports images/s, step seconds, FLOPs per step (XLA cost analysis of our compiled step; the
same model and batch, so the reference's achieved FLOP/s uses the same count) and MFU against
a matmul peak measured on this machine (`metrics.measure_matmul_peak`; on a TPU/GPU the
table value of `metrics.peak_flops_per_device`).

Warm-up is 3 steps by default: eager PyTorch on CPU spends seconds in its first steps (oneDNN
primitive creation for each conv shape forward and backward, AdamW state allocation).
"""
from __future__ import annotations

import logging
import tempfile
import time

import jax

from pbe_jax import sharding as shd
from pbe_jax.benchmarks import model as bm
from pbe_jax.benchmarks import torch_ref
from pbe_jax.benchmarks.report import (Row, compiled_bytes, device_peak_bytes, median_seconds,
                                       torch_peak_bytes)
from pbe_jax.metrics import peak_flops_per_device
from pbe_jax.training.state import step_flops

log = logging.getLogger("pbe_jax")


def run(size, *, dtype: str = "fp32", reps: int = 3, warmup: int = 3, reference: bool = True,
        attention_impl: str | None = None, torch_compile: bool = False) -> list[Row]:
    """`torch_compile`: also time the reference with `torch.compile` on its UNet (extra rows
    `*_vs_torch_compile`). Peak device memory rows appear on an accelerator only."""
    name = f"train/{size.name}"
    compiled_ref_s = ref_peak = None
    with tempfile.TemporaryDirectory(prefix="pbe_bench_") as export:
        setup, params, frozen, _ = bm.build(size, dtype=dtype, export_dir=export if reference else None,
                                            attention_impl=attention_impl)
        cfg = setup.config
        host = bm.random_batch(cfg.train.batch_size, cfg.data.resolution, cfg.data.reference_size)
        batch = {k: jax.device_put(v, shd.batch_sharding(setup.mesh, 4)) for k, v in host.items()}
        state = setup.new_state(params)
        t0 = time.perf_counter()
        compiled = setup.jit_step().lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        flops = step_flops(compiled)
        step_bytes = compiled_bytes(compiled)
        holder = {"state": state}

        def ours():
            holder["state"], metrics = compiled(holder["state"], frozen, batch)
            jax.block_until_ready(metrics["loss"])

        ours_s, _ = median_seconds(ours, reps=reps, warmup=warmup)
        ours_peak = device_peak_bytes()
        del holder, state, params, frozen, compiled
        ref_s = None
        if reference:
            import torch

            dev = torch_ref.torch_device()
            autocast = torch.bfloat16 if dtype == "bf16" else None
            step = torch_ref.TorchTrainStep(torch_ref.load_components(export, dev), lr=cfg.train.lr,
                                            cond_drop_prob=cfg.train.cond_drop_prob, autocast_dtype=autocast)
            tb = torch_ref.to_torch_batch(host, dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            torch_peak_bytes(dev, reset=True)
            ref_s, _ = median_seconds(lambda: (step(tb), sync()), reps=reps, warmup=warmup)
            ref_peak = torch_peak_bytes(dev)
            if torch_compile:  # same step, same optimizer; the UNet's fwd+bwd compiled
                step.unet = torch.compile(step.unet)
                compiled_ref_s, _ = median_seconds(lambda: (step(tb), sync()), reps=reps,
                                                   warmup=max(warmup, 1))
            del step
    peak = peak_flops_per_device()
    b = cfg.train.batch_size
    ref = lambda f: None if ref_s is None else f(ref_s)  # noqa: E731
    rows = [
        Row(f"{name}/images_per_s", b / ours_s, ref(lambda s: b / s), "images/s"),
        Row(f"{name}/step_time", ours_s, ref(lambda s: s), "s"),
        Row(f"{name}/flops_per_step", flops, None, "FLOP"),
        Row(f"{name}/achieved_flops", flops / ours_s, ref(lambda s: flops / s), "FLOP/s"),
        Row(f"{name}/mfu", flops / ours_s / peak, ref(lambda s: flops / s / peak), "fraction of peak"),
        Row(f"{name}/peak", peak, None, "FLOP/s (measured matmul)"),
        Row(f"{name}/compile_time", compile_s, None, "s"),
    ]
    if compiled_ref_s is not None:
        rows.append(Row(f"{name}/images_per_s_vs_torch_compile", b / ours_s, b / compiled_ref_s,
                        "images/s (reference: torch.compile UNet)"))
    if step_bytes is not None:
        rows.append(Row(f"{name}/compiled_step_bytes", step_bytes, None, "bytes (args+out+temp-alias)"))
    if ours_peak is not None:
        rows.append(Row(f"{name}/peak_device_memory", ours_peak, ref_peak, "bytes"))
    return rows
