"""The one place where PyTorch weight layouts meet pbe_jax (NHWC) layouts.

NNX module paths mirror PyTorch attribute paths (`down_blocks/0/resnets/1/conv1/kernel` is
`down_blocks.0.resnets.1.conv1.weight`), so mapping a state dict is a rename and a transpose:

| NNX leaf           | PyTorch             | layout change                                 |
|--------------------|---------------------|-----------------------------------------------|
| `kernel` (2-D)     | `weight` [out, in]  | transpose -> [in, out]                        |
| `kernel` (4-D)     | `weight` [O, I, kh, kw] | -> [kh, kw, I, O]                         |
| `scale`            | `weight`            | none (norm scale)                             |
| `embedding`        | `weight`            | none (embedding table)                        |
| anything else      | same name           | none (`bias`, `class_embedding`, `uncond_vector`) |

Loading is strict: every missing, unexpected, mis-shaped or non-float key is collected and
reported in one `CheckpointMismatchError`; `allow_missing` glob patterns are the only way to
accept gaps (those params keep the module's own initial values).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys/shapes/dtypes do not match the model. Lists every offending key."""


@dataclass
class LoadReport:
    loaded: int = 0
    missing_allowed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def path_to_torch_key(path: tuple) -> str:
    *mods, leaf = (str(p) for p in path)
    return ".".join([*mods, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_torch_layout(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)
    return arr


def from_torch_layout(leaf: str, arr: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if len(expected) == 4 and arr.ndim == 2 and expected[:2] == (1, 1):
            arr = arr[:, :, None, None]  # a Linear stored where the model has a 1x1 conv
        if len(expected) == 2 and arr.ndim == 4 and arr.shape[2:] == (1, 1):
            arr = arr[:, :, 0, 0]  # a 1x1 conv stored where the model has a Linear
        if arr.ndim == 2:
            return arr.T
        if arr.ndim == 4:
            return arr.transpose(2, 3, 1, 0)
    return arr


def param_leaves(module: nnx.Module) -> dict[tuple, nnx.Variable]:
    """{path: Param variable} of a module (concrete or abstract)."""
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def module_to_torch_state_dict(module: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """The module's params as a PyTorch-layout state dict of numpy arrays (host copies)."""
    out = {}
    for path, var in param_leaves(module).items():
        arr = np.asarray(jax.device_get(var.get_value() if hasattr(var, "get_value") else var.value))
        arr = to_torch_layout(str(path[-1]), arr)
        if dtype is not None:
            arr = arr.astype(dtype)
        out[path_to_torch_key(path)] = np.ascontiguousarray(arr)
    return out


def _shape_only(src) -> np.ndarray:
    """A zero-stride stand-in with `src`'s shape and dtype: the checks run the layout change on
    it, so a lazily read tensor (`safetensors_io.LazyTensor`) is read once, when it is placed."""
    return np.broadcast_to(np.zeros((), src.dtype), tuple(src.shape))


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    source: str = "checkpoint",
    allow_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
) -> LoadReport:
    """Copy a PyTorch-layout state dict into `module`'s params, in place, strictly.

    `place(path, array)` puts each converted array on devices (default: `jnp.asarray`, i.e. the
    default device). With an abstract module (from `nnx.eval_shape`) every param must be in the
    state dict: missing ones have no value to keep.
    `ignore_unexpected` globs name checkpoint keys that are known and deliberately unused
    (buffers such as `position_ids`); they are reported in `LoadReport.ignored`.
    """
    allow_missing, ignore_unexpected = list(allow_missing), list(ignore_unexpected)
    leaves = param_leaves(module)
    by_key = {path_to_torch_key(p): p for p in leaves}
    missing, bad_shape, bad_dtype, report = [], [], [], LoadReport()
    for key, path in by_key.items():
        if key not in state_dict:
            if _matches(key, allow_missing):
                report.missing_allowed.append(key)
                if isinstance(leaves[path].get_value(), jax.ShapeDtypeStruct):
                    missing.append(f"{key} (allowed, but the model is abstract: no value to keep)")
            else:
                missing.append(key)
            continue
        src = state_dict[key]
        var = leaves[path]
        expected = tuple(var.get_value().shape)
        if not (np.issubdtype(src.dtype, np.floating) or src.dtype.name == "bfloat16"):
            bad_dtype.append(f"{key}: dtype {src.dtype}, expected a float tensor")
            continue
        arr = from_torch_layout(str(path[-1]), _shape_only(src), expected)
        if arr.shape != expected:
            bad_shape.append(f"{key}: checkpoint {tuple(src.shape)} (as NHWC {arr.shape}), model {expected}")
            continue
    unexpected = [k for k in state_dict if k not in by_key and not _matches(k, ignore_unexpected)]
    report.ignored = sorted(k for k in state_dict if k not in by_key and _matches(k, ignore_unexpected))
    if missing or unexpected or bad_shape or bad_dtype:
        parts = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", bad_shape), ("dtype mismatches", bad_dtype)):
            if items:
                shown = sorted(items)
                parts.append(f"  {len(items)} {title}: " + ", ".join(shown[:50])
                             + (f" ... (+{len(shown) - 50} more)" if len(shown) > 50 else ""))
        parts.append("  (pass allow_missing=[GLOB, ...] / --allow-missing GLOB to accept missing keys)")
        raise CheckpointMismatchError("\n".join(parts))
    place = place or (lambda path, a: jnp.asarray(a))
    for key, path in by_key.items():
        if key not in state_dict:
            continue
        var = leaves[path]
        dtype = var.get_value().dtype
        arr = from_torch_layout(str(path[-1]), np.asarray(state_dict[key]), tuple(var.get_value().shape))
        var.set_value(place(path, np.asarray(arr, dtype=dtype)))
        report.loaded += 1
    nnx.update(module, nnx.from_flat_state(leaves))
    return report
