"""Parameter initialisation on the host, PyTorch's way, from (seed, parameter path).

Deterministic per path, so the values are the same for any mesh or process count, and built
with numpy: NNX's own initialisers run one threefry draw per param inside a jitted init, whose
XLA compile takes minutes on a CPU for a model of hundreds of arrays.

- `host_init`: one array, from its path and shape (random init of a whole model: the demo,
  training from scratch).
- `torch_default_init`: a set of params with PyTorch's own `reset_parameters` (Linear / Conv
  biases uniform too, which needs the sibling kernel's fan-in): the fresh head of `sd-init`
  (mapper, final LayerNorm, proj_out, uncond_vector), as the official code initialises it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

Path = tuple[str, ...]


def _rng(path: Path, seed: int) -> np.random.Generator:
    digest = np.frombuffer(("/".join(path)).encode(), np.uint8)
    return np.random.default_rng([seed, *np.resize(digest, 64).tolist()])


def kernel_fan_in(shape: tuple[int, ...]) -> int:
    """fan_in of a Flax kernel ([in, out] linear, [kh, kw, in, out] conv): all but the last axis."""
    return max(int(np.prod(shape[:-1])), 1)


def host_init(path: Path, shape: tuple[int, ...], seed: int, *, bias_fan_in: int | None = None
              ) -> np.ndarray:
    """PyTorch-default-style init of one param from (seed, its path):
    kernels U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch Linear / Conv weights: kaiming_uniform
    with a=sqrt(5) has exactly that bound); norms: scale 1, bias 0; biases 0, or with
    `bias_fan_in` U(-1/sqrt(bias_fan_in), 1/sqrt(bias_fan_in)) as torch Linear / Conv biases;
    embeddings and DINOv2's tokens N(0, 0.02), its layer scales 1, its mask token 0; LoRA factors
    as PEFT's (`lora_a` as a kernel, `lora_b` 0); other vectors (`uncond_vector`,
    `class_embedding`) N(0, 1)."""
    name = path[-1]
    rng = _rng(path, seed)
    if name in ("scale", "lambda1"):  # norm scales; DINOv2's layer scales (layerscale_value 1.0)
        return np.ones(shape, np.float32)
    if name == "mask_token":  # DINOv2's (masked-patch pre-training only), zero as transformers'
        return np.zeros(shape, np.float32)
    if name == "bias":
        if bias_fan_in is None:
            return np.zeros(shape, np.float32)
        bound = 1.0 / np.sqrt(bias_fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name == "lora_b":  # a LoRA adapter starts at zero effect (models/lora.py)
        return np.zeros(shape, np.float32)
    if name in ("kernel", "lora_a"):
        bound = 1.0 / np.sqrt(kernel_fan_in(shape))
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name in ("embedding", "position_embeddings", "cls_token", "register_tokens"):
        # tables and DINOv2's learned tokens (transformers: trunc_normal(0.02); registers random
        # too, so that they are not identical forever)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def torch_default_init(shapes: Mapping[Path, tuple[int, ...]], seed: int) -> dict[Path, np.ndarray]:
    """PyTorch's `reset_parameters` for every param in `shapes` (NNX path -> shape): a bias next
    to a `kernel` (Linear / Conv) is U(+-1/sqrt(fan_in of that kernel)); a bias next to a
    `scale` (LayerNorm / GroupNorm) is 0; the rest as `host_init`."""
    out = {}
    for path, shape in shapes.items():
        fan_in = None
        if path[-1] == "bias":
            kernel = shapes.get((*path[:-1], "kernel"))
            fan_in = kernel_fan_in(tuple(kernel)) if kernel is not None else None
        out[path] = host_init(path, tuple(shape), seed, bias_fan_in=fan_in)
    return out
