"""LoRA files: read a LoRA training run (pbe_jax workdir / step) or a diffusers/PEFT
`pytorch_lora_weights.safetensors`, apply it to a model, fuse / unfuse it, and write the
diffusers/PEFT format.

`Adapter` is one run's adapters in pbe_jax layout: per adapted Linear (dotted NNX path,
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) `lora_a` [in, r] and `lora_b`
[r, out] with `alpha / rank`, plus `params`: the other trained parts of a pbe_jax run
(`image_encoder.uncond_vector`, ...; dotted NNX param path -> array), which replace the base's.

diffusers/PEFT layout (what `UNet2DConditionModel.load_lora_adapter` reads): keys
`unet.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; PEFT scales by
lora_alpha / r with lora_alpha = r when the file names none, so the export folds this run's
alpha / rank into lora_B (the product is the same, exactly for alpha == rank).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import load_file, save_file

from pbe_jax import checkpoint
from pbe_jax.convert.load import load_pipeline
from pbe_jax.models.lora import LoRASpec, add_lora, lora_layers, put_scale, set_module

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclasses.dataclass
class Adapter:
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # path -> (lora_a [in, r], lora_b [r, out])
    alpha_over_rank: float
    params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(next(iter(self.layers.values()))[0].shape[1])


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, str(k))))
        return out
    return {prefix: np.asarray(tree)}


def read_run(path: str, use_ema: bool | None = None) -> Adapter:
    """The adapters of a pbe_jax LoRA run: a workdir (its newest step) or one step directory.
    `use_ema=None`: the EMA copy when the run kept one (what its sample grids and scores used,
    as `PaintByExample.from_pretrained` of a full run), else the raw params."""
    steps = checkpoint.training_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path}: no pbe_jax training checkpoint (a LoRA run's workdir or step)")
    step_dir = steps[-1]
    lcfg = checkpoint.read_config(step_dir).get("train", {}).get("lora", {})
    if not lcfg or not int(lcfg.get("rank", 0)):
        raise ValueError(f"{step_dir}: not a LoRA run (its config.train.lora.rank is 0 or absent)")
    key, _ = checkpoint.params_key(step_dir, use_ema)
    state = checkpoint.restore_numpy(epath.Path(step_dir) / checkpoint.STATE, keys=[key])[key]
    flat = _flatten(state)
    layers, params = {}, {}
    for p, x in flat.items():
        if p[-2:-1] == ("lora",):
            continue
        params[".".join(p)] = x
    for p, x in flat.items():
        if p[-2:] == ("lora", "lora_a"):
            name = ".".join(p[:-2])
            layers[name] = (x, flat[(*p[:-1], "lora_b")])
    if not layers:
        raise ValueError(f"{step_dir}: the run's params hold no LoRA adapter (lora_a / lora_b)")
    rank = int(lcfg["rank"])
    alpha = float(lcfg.get("alpha") or rank)
    return Adapter(layers, alpha / rank, params)


def _torch_name(nnx_path: str) -> str:
    return nnx_path  # pbe_jax module paths mirror diffusers' (`to_out.0`, `ff.net.2`)


def read_peft(file: str) -> Adapter:
    """A diffusers/PEFT LoRA safetensors file (`unet.<module>.lora_A.weight` [r, in],
    `.lora_B.weight` [out, r]; lora_alpha = r)."""
    tensors = load_file(file)
    layers = {}
    for k, a in tensors.items():
        if not k.endswith(".lora_A.weight"):
            continue
        name = k[: -len(".lora_A.weight")]
        b_key = f"{name}.lora_B.weight"
        if b_key not in tensors:
            raise ValueError(f"{file}: {k} has no {b_key}")
        if not name.startswith("unet."):
            raise ValueError(f"{file}: {k}: only UNet adapters (keys 'unet.*') are supported")
        layers[name] = (np.ascontiguousarray(a.T.astype(np.float32)),
                        np.ascontiguousarray(tensors[b_key].T.astype(np.float32)))
    if not layers:
        raise ValueError(f"{file}: no LoRA tensors (keys ending in .lora_A.weight)")
    return Adapter(layers, 1.0)


def read_lora(path: str, use_ema: bool | None = None) -> Adapter:
    """A LoRA from a pbe_jax run (workdir / step), a .safetensors file, or a folder holding
    `pytorch_lora_weights.safetensors`. `use_ema`: a run's EMA or raw adapters (`read_run`)."""
    p = epath.Path(path)
    if p.is_dir() and (p / LORA_WEIGHTS).exists():
        return read_peft(str(p / LORA_WEIGHTS))
    if str(path).endswith(".safetensors"):
        return read_peft(str(path))
    return read_run(str(path), use_ema=use_ema)


def _param_at(model, dotted: str) -> nnx.Variable:
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_lora(model, adapter: Adapter, scale: float = 1.0) -> list[str]:
    """Add `adapter` to `model` in place (the layers it names get adapters with its values, at
    `scale`; its other trained params replace the model's). A second call replaces the
    adapters' values (same layers and rank) without changing the model's structure."""
    existing = lora_layers(model)
    if not existing:
        spec = LoRASpec(rank=adapter.rank, alpha=adapter.alpha_over_rank * adapter.rank,
                        targets=tuple(adapter.layers),
                        components=tuple(sorted({n.split(".", 1)[0] for n in adapter.layers})))
        add_lora(model, spec, nnx.Rngs(0), scale=scale)
        existing = lora_layers(model)
    missing = sorted(set(adapter.layers) - set(existing))
    if missing:
        raise ValueError(f"LoRA names layers the model has no adapter slot for: {missing[:3]}")
    for name, (a, b) in adapter.layers.items():
        layer = existing[name]
        if layer.lora.lora_a[...].shape != a.shape or layer.lora.lora_b[...].shape != b.shape:
            raise ValueError(f"LoRA {name}: shapes {a.shape}, {b.shape} do not fit the layer's "
                             f"{layer.lora.lora_a[...].shape}, {layer.lora.lora_b[...].shape}")
        layer.lora.lora_a[...] = jnp.asarray(a, layer.lora.lora_a[...].dtype)
        layer.lora.lora_b[...] = jnp.asarray(b, layer.lora.lora_b[...].dtype)
        layer.lora_alpha_over_rank = adapter.alpha_over_rank
        put_scale(layer, scale * adapter.alpha_over_rank)
    for name, x in adapter.params.items():
        var = _param_at(model, name)
        if var[...].shape != x.shape:
            raise ValueError(f"LoRA param {name}: shape {x.shape}, the model's is {var[...].shape}")
        var[...] = jnp.asarray(x, var[...].dtype)
    return sorted(adapter.layers)


def fuse(model) -> None:
    """Merge every adapter into its kernel (kernel += multiplier * a @ b) and set its
    multiplier to 0; `unfuse` undoes it (up to fp32 rounding, as diffusers' unfuse_lora)."""
    for layer in lora_layers(model).values():
        s = float(layer.lora_scale[...])
        if getattr(layer, "lora_fused_scale", 0.0):
            continue
        layer.kernel[...] = layer.merged_kernel()
        layer.lora_fused_scale = s
        put_scale(layer, 0.0)


def unfuse(model) -> None:
    for layer in lora_layers(model).values():
        s = getattr(layer, "lora_fused_scale", 0.0)
        if not s:
            continue
        a, b = layer.lora.lora_a[...], layer.lora.lora_b[...]
        k = layer.kernel[...]
        layer.kernel[...] = (k.astype(jnp.float32) - s * (a @ b)).astype(k.dtype)
        layer.lora_fused_scale = 0.0
        put_scale(layer, s)


def is_lora_run(path: str) -> bool:
    """A pbe_jax training workdir / step whose config trains LoRA adapters."""
    steps = checkpoint.training_steps(path) if epath.Path(path).is_dir() else []
    if not steps:
        return False
    return bool(int(checkpoint.read_config(steps[-1]).get("train", {}).get("lora", {}).get("rank", 0) or 0))


def load_run(path: str, *, use_ema: bool | None = None, cls=None, return_report: bool = False, **kw):
    """A LoRA run's model: its base, loaded from where the run got it (`config.init_from`),
    with the run's adapters and other trained params. Raises ValueError for a run whose base
    was a random init (there is nothing to load it from)."""
    config = checkpoint.read_config(checkpoint.training_steps(path)[-1])
    init = config.get("init_from", {})
    if not init.get("format"):
        raise ValueError(f"{path}: the LoRA run's base was a random init (config.init_from is "
                         "empty): pass the base yourself (PaintByExample.from_pretrained(base)"
                         ".load_lora(run))")
    extra = {"cls": cls} if cls is not None else {}
    model, report = load_pipeline(init["format"], init["path"], clip=init.get("clip") or None,
                                  model_config=config.get("model"), return_report=True, **extra, **kw)
    apply_lora(model, read_run(path, use_ema=use_ema))
    report.notes.append(f"LoRA adapters of {path} on the base {init['format']}:{init['path']}")
    return (model, report) if return_report else model


def merge(model) -> None:
    """Fuse every adapter into its kernel and put a plain `nnx.Linear` (the fused kernel and
    the bias, same Variables) in its place: an ordinary model, e.g. to save as diffusers."""
    fuse(model)
    for name, layer in lora_layers(model).items():
        plain = nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.use_bias,
                           dtype=layer.dtype, param_dtype=layer.param_dtype,
                           precision=layer.precision, kernel_init=nnx.initializers.zeros_init(),
                           rngs=nnx.Rngs(0))
        plain.kernel = layer.kernel
        if layer.use_bias:
            plain.bias = layer.bias
        set_module(model, tuple(int(p) if p.isdigit() else p for p in name.split(".")), plain)


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """diffusers/PEFT tensors of `adapter` (alpha / rank folded into lora_B)."""
    out = {}
    for name, (a, b) in sorted(adapter.layers.items()):
        t = _torch_name(name)
        out[f"{t}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        out[f"{t}.lora_B.weight"] = np.ascontiguousarray(
            (np.asarray(b, np.float32) * np.float32(adapter.alpha_over_rank)).T)
    return out


def save_peft(adapter: Adapter, dst: str) -> str:
    """Write `dst/pytorch_lora_weights.safetensors` (atomically). Returns the file's path."""
    os.makedirs(dst, exist_ok=True)
    path = os.path.join(dst, LORA_WEIGHTS)
    tmp = path + ".tmp"
    save_file(peft_tensors(adapter), tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


__all__ = ["Adapter", "LORA_WEIGHTS", "apply_lora", "fuse", "peft_tensors", "read_lora",
           "is_lora_run", "load_run", "merge", "read_peft", "read_run", "save_peft", "unfuse"]
