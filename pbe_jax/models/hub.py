"""`from_pretrained` / `save_pretrained` for every pbe_jax model, in diffusers/transformers format.

A component directory holds `config.json` plus weights: `<name>.safetensors`,
`<name>.<variant>.safetensors` (e.g. fp16), a sharded `<name>.safetensors.index.json`, or the
legacy pickle `<name>.bin` (read with `torch.load(weights_only=True)`, the only path that needs
torch). `<name>` is `diffusion_pytorch_model` for diffusers and `model` / `pytorch_model` for
transformers. A path that is not a local directory is treated as a Hugging Face Hub repo id.

Each model class sets:
- `config_class`: a dataclass with `from_dict(dict)` (rejects unsupported settings) and
  `to_dict()` (a full `config.json` that the reference library loads);
- `WEIGHTS_NAMES`: file stems to look for, first match wins;
- `IGNORE_KEYS`: globs of checkpoint keys that are known and deliberately unused (buffers);
- optionally `rename_legacy_keys(state_dict)` for old key spellings.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import (
    LoadReport,
    load_torch_state_dict,
    module_to_torch_state_dict,
)


def resolve_dir(path: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """A local directory for `path` (+ `subfolder`), downloading `path` as a Hub repo id if it is
    not a local directory."""
    if os.path.isdir(path):
        d = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{path}: no subfolder {subfolder!r} (found: {sorted(os.listdir(path))})")
        return d
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: not a directory, and not a Hub repo id of the form 'org/name'")
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (network only when asked)

    patterns = [f"{subfolder}/*"] if subfolder else None
    root = snapshot_download(repo_id=path, revision=revision, allow_patterns=patterns)
    return os.path.join(root, subfolder) if subfolder else root


def find_weight_files(directory: str, names: Iterable[str], variant: str | None = None) -> list[str]:
    """The weight file(s) of a component directory, safetensors first, variant first."""
    names = list(names)
    cands = []
    for ext in ("safetensors", "bin"):
        for name in names:
            stems = ([f"{name}.{variant}"] if variant else []) + [name]
            for stem in stems:
                cands.append(f"{stem}.{ext}")
                cands.append(f"{stem}.{ext}.index.json")
    for c in cands:
        p = os.path.join(directory, c)
        if not os.path.isfile(p):
            continue
        if c.endswith(".index.json"):
            with open(p) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, x) for x in files]
        return [p]
    raise FileNotFoundError(
        f"{directory}: no weights file; looked for {cands[:6]}... ; present: {sorted(os.listdir(directory))}"
    )


class PretrainedMixin:
    """Mixin for NNX models that read/write diffusers/transformers component directories."""

    config_class: Any = None
    WEIGHTS_NAMES: tuple[str, ...] = ("diffusion_pytorch_model",)
    IGNORE_KEYS: tuple[str, ...] = ()

    @classmethod
    def rename_legacy_keys(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return state_dict

    @classmethod
    def load_config(cls, path: str, subfolder: str | None = None, revision: str | None = None):
        d = resolve_dir(path, subfolder, revision)
        cfg_path = os.path.join(d, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{d}: no config.json")
        with open(cfg_path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
        return cls.config_class.from_dict(raw)

    @classmethod
    def from_config(cls, config, *, seed: int = 0, abstract: bool = False, **runtime):
        """A randomly initialised model (or its abstract shapes with `abstract=True`)."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        make = lambda: cls(config, rngs=nnx.Rngs(seed), **runtime)  # noqa: E731
        return nnx.eval_shape(make) if abstract else make()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        allow_missing: Iterable[str] = (),
        place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
        return_report: bool = False,
        **runtime,
    ):
        """Load a component directory (or Hub repo id). `runtime` goes to the constructor
        (`dtype`, `param_dtype`, `attention_impl`, `remat`, ...). `place(path, array)` puts each
        param on devices (e.g. straight into its sharding); default: the default device."""
        d = resolve_dir(path, subfolder, revision)
        config = cls.load_config(d)
        files = find_weight_files(d, cls.WEIGHTS_NAMES, variant)
        sd = cls.rename_legacy_keys(stio.read_checkpoint_files(files))
        model = cls.from_config_and_state_dict(
            config, sd, source=", ".join(files), allow_missing=allow_missing, place=place,
            return_report=return_report, **runtime)
        return model

    @classmethod
    def from_config_and_state_dict(cls, config, state_dict, *, source="state dict", allow_missing=(),
                                   place=None, return_report=False, **runtime):
        allow_missing = list(allow_missing)
        # Abstract first: weights go straight from host memory to their devices. Only when gaps
        # are allowed do we need real initial values for the params the checkpoint lacks.
        model = cls.from_config(config, abstract=not allow_missing, **runtime)
        report = load_torch_state_dict(
            model, state_dict, source=source, allow_missing=allow_missing,
            ignore_unexpected=cls.IGNORE_KEYS, place=place)
        return (model, report) if return_report else model

    def torch_state_dict(self, dtype=None) -> dict[str, np.ndarray]:
        """Params as a PyTorch-layout state dict (the keys diffusers/transformers use)."""
        return module_to_torch_state_dict(self, dtype=dtype)

    def load_torch_state_dict(self, state_dict, **kw) -> LoadReport:
        return load_torch_state_dict(self, self.rename_legacy_keys(dict(state_dict)),
                                     ignore_unexpected=self.IGNORE_KEYS, **kw)

    def save_pretrained(self, path: str, *, dtype=None, variant: str | None = None) -> str:
        """Write `config.json` + `<WEIGHTS_NAMES[0]>[.variant].safetensors` (PyTorch layout);
        `dtype` (e.g. np.float16) casts the saved tensors."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
        stem = self.WEIGHTS_NAMES[0] + (f".{variant}" if variant else "")
        out = os.path.join(path, stem + ".safetensors")
        stio.write_safetensors(out, self.torch_state_dict(dtype=dtype))
        return out


def num_params(module: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def cast_dtype(name_or_dtype) -> Any:
    """'bf16' / 'bfloat16' / 'fp32' / 'float32' / dtype -> jnp dtype."""
    if not isinstance(name_or_dtype, str):
        return name_or_dtype
    table = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32,
             "float32": jnp.float32, "fp16": jnp.float16, "float16": jnp.float16}
    if name_or_dtype not in table:
        raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(table)}")
    return table[name_or_dtype]
