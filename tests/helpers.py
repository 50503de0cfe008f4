"""Helpers shared by the tests: comparing against a reference, random PyTorch weights, a free
port, a tiny random CLIP on disk. (Training configs are in tests/train_utils.py.)"""
from __future__ import annotations

import socket

import numpy as np


# LLVM -O0: the XLA flag of the test workers (tests/conftest.py) and of the command lines the
# tests start (`train_utils.subprocess_env`): most programs are compiled once and run a few
# steps, so compiling costs more than running.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
# XLA's default LLVM optimisation level, for a test that compares two programs at the last float
# bit: `jax.jit(f, compiler_options=OPTIMIZED)` (-O0 rounds differently: no FMA contraction).
OPTIMIZED = {"xla_backend_optimization_level": 3}


def assert_close(ours, ref, what: str = "", rel: float = 1e-4) -> None:
    """max|ours - ref| <= rel * max(1, max|ref|), in float64, shapes equal."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    err, tol = np.abs(ours - ref).max(), rel * max(1.0, np.abs(ref).max())
    assert err <= tol, f"{what}: max|ours - reference| = {err:.3e} > {tol:.3e}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def randomize(module, seed: int) -> None:
    """Every param of a torch module ~ N(0, 0.3^2), 1-D params (biases, norm scales) offset by 0.1."""
    import torch  # the parity tests' reference only: the package itself never imports torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if p.ndim > 1 else 0.1))


def randomize_fan_in(module, seed: int, *, gain: float = 1.0, is_norm_scale=None) -> None:
    """Every param random, so no zero-init or unit-norm value hides a wiring or mapping error:
    weights N(0, 1) * gain / sqrt(fan_in) (activations stay O(1) through a deep net), 1-D params
    that `is_norm_scale(name)` picks (default: the `*norm*.weight`s) 1 + 0.2 N(0, 1), the rest
    0.1 N(0, 1)."""
    import torch

    is_norm_scale = is_norm_scale or (lambda name: "norm" in name and name.endswith("weight"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise * (gain / p[0].numel() ** 0.5))
            elif is_norm_scale(name):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def save_tiny_clip(path: str, *, image_size: int, patch_size: int, projection_dim: int):
    """A 2-layer, 32-wide transformers CLIPVisionModelWithProjection with large random weights
    (embeddings that differ between images) saved to `path`: the metrics' CLIP in tests. Returns
    the torch model."""
    import torch
    import transformers

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                        projection_dim=projection_dim, hidden_act="quick_gelu")
    tm = transformers.CLIPVisionModelWithProjection(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0, 0.2, generator=g)
    tm.save_pretrained(path)
    return tm
