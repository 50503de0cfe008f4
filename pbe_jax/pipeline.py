"""`PaintByExample`: the user-facing pipeline. The networks and configs are those of
`pbe_jax.models.PaintByExampleModel`; this class adds loading (`from_pretrained`), saving
(`save_pretrained`) and editing (`__call__`), the way diffusers' `PaintByExamplePipeline` is
used:
    pipe = PaintByExample.from_pretrained("Fantasy-Studio/Paint-by-Example")
    out = pipe(image=src, mask_image=mask, example_image=ref)   # or pipe(src, mask, ref)
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.convert import diffusers_io, ldm_io, lora_io, orbax_io
from pbe_jax.convert.load import load_pipeline
from pbe_jax.convert.model_card import CardInfo, as_card_info, write_model_card
from pbe_jax.inference import edit
from pbe_jax.models import hub
from pbe_jax.models.hub import cast_dtype
from pbe_jax.models.lora import set_lora_scale
from pbe_jax.models.paint_by_example import FROZEN, TRAINABLE, PaintByExampleModel

__all__ = ["FROZEN", "PaintByExample", "TRAINABLE"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # one original-layout LDM checkpoint


def _one_of(ours: str, value, diffusers_name: str, diffusers_value):
    """An input given by our name or by diffusers' `PaintByExamplePipeline` name, not both."""
    if value is not None and diffusers_value is not None:
        raise TypeError(f"got both {ours}= and {diffusers_name}= (diffusers' name for it); give one")
    if value is None and diffusers_value is None:
        raise TypeError(f"missing the {ours} image: pass it positionally, as {ours}=, or as "
                        f"{diffusers_name}= (diffusers' name)")
    return value if value is not None else diffusers_value


class PaintByExample(PaintByExampleModel):
    """unet [B,h,w,9]->[B,h,w,4], vae, image_encoder [B,224,224,3]->[B,1,768] + configs, with
    `from_pretrained` / `save_pretrained` / `__call__`."""

    def __call__(self, source=None, mask=None, reference=None, *, image=None, mask_image=None,
                 example_image=None, **kwargs):
        """Paint `reference` into the white region of `mask` on `source`; arguments and return
        values in `pbe_jax.inference.edit` (num_inference_steps=50, guidance_scale=5.0,
        scheduler=None (the model's own: PLMS for the released PbE), seed=0,
        num_images_per_prompt=1, latents=None, masked_latents='sample',
        paste_back=False, mask_crop_padding=None, reference_preprocess='squash',
        output_type='pil', progress_bar=False, callback=None: `callback(step, total)` per
        denoising step). diffusers' names work too: `image=`, `mask_image=`, `example_image=`."""
        source = _one_of("source", source, "image", image)
        mask = _one_of("mask", mask, "mask_image", mask_image)
        reference = _one_of("reference", reference, "example_image", example_image)
        return edit(self, source, mask, reference, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        variant: str | None = None, revision: str | None = None,
                        attention_impl: str = "xla", remat: bool = False,
                        remat_policy: str | None = None, allow_missing=(), place=None,
                        use_ema: bool | None = None, model_config: Mapping[str, Any] | None = None,
                        seed: int = 0, return_report: bool = False, cache_dir: str | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        force_download: bool = False, use_safetensors: bool | None = None):
        """Load a diffusers Paint-by-Example repository (local dir or Hub id, e.g.
        `Fantasy-Studio/Paint-by-Example`; safetensors or .bin; `variant='fp16'`), or a pbe_jax
        orbax checkpoint (a params checkpoint, a training workdir or one of its steps).

        `dtype` is the compute dtype, `param_dtype` the params' (fp16/bf16 weights are cast to
        it). `place(path, array)` puts each param on devices. `use_ema` picks a training
        checkpoint's EMA params (default None: the EMA params when the run kept them, as its
        sample grids and scores did, with one log line saying which loaded; False: the raw
        ones). A single `.safetensors` / `.ckpt` file loads as an original-layout LDM
        checkpoint (`from_single_file`). `allow_missing` globs (`unet.conv_in.*`) accept absent params,
        which keep their initial values (seeded by `seed`). Hub options, with diffusers' names
        and meanings (`models.hub.resolve`): `revision`, `cache_dir`, `local_files_only`,
        `token`, `force_download`, `use_safetensors` (None: safetensors, else .bin; True / False:
        only that format); `HF_HUB_OFFLINE=1` loads from the cache. Returns the model, or
        (model, PipelineReport).
        """
        if os.path.isfile(path_or_hub_id) and path_or_hub_id.endswith(SINGLE_FILE_SUFFIXES):
            fmt = "ldm"
        else:
            fmt = "orbax" if orbax_io.is_checkpoint(path_or_hub_id) else "diffusers"
        return load_pipeline(fmt, path_or_hub_id, variant=variant, revision=revision, dtype=dtype,
                             param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
                             remat_policy=remat_policy, allow_missing=allow_missing, place=place,
                             use_ema=use_ema, model_config=model_config, seed=seed,
                             return_report=return_report, cls=cls, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token,
                             force_download=force_download, use_safetensors=use_safetensors)

    def load_lora(self, path: str, scale: float = 1.0, *, use_ema: bool | None = None) -> list[str]:
        """Add a LoRA (`convert.lora_io.read_lora`: a pbe_jax LoRA run's workdir or step, or a
        diffusers/PEFT `pytorch_lora_weights.safetensors` / its folder) at `scale`; a run's
        other trained parts (`uncond_vector`, ...) replace this model's. A run's EMA adapters
        when it kept them (`use_ema=None`, as `from_pretrained`), `use_ema=False` the raw ones.
        Returns the adapted layer paths. The scale is a model variable: `set_lora_scale`
        recompiles nothing."""
        return lora_io.apply_lora(self, lora_io.read_lora(path, use_ema=use_ema), scale)

    def with_lora(self, path: str | None, scale: float = 1.0,
                  use_ema: bool | None = None) -> "PaintByExample":
        """`load_lora(path, scale, use_ema=...)` when `path` is given (the commands' --lora,
        with their --use_ema); returns self."""
        if path:
            self.load_lora(path, scale=scale, use_ema=use_ema)
        return self

    def set_lora_scale(self, scale: float) -> None:
        """Every adapter's output times `scale` (0: the base model; 1: as trained)."""
        set_lora_scale(self, scale)

    def fuse_lora(self) -> None:
        """Merge the adapters into the base kernels (diffusers' `fuse_lora`)."""
        lora_io.fuse(self)

    def unfuse_lora(self) -> None:
        """Undo `fuse_lora` (the kernels as before, up to fp32 rounding)."""
        lora_io.unfuse(self)

    @classmethod
    def from_single_file(cls, path: str, **kwargs):
        """An original-layout LDM checkpoint (one `.safetensors` / `.ckpt` file, e.g. the
        released `model.ckpt` or `save_pretrained(format='ldm')`), as diffusers'
        `from_single_file`; keyword arguments as `from_pretrained`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (from_single_file loads one .safetensors / .ckpt file)")
        return cls.from_pretrained(path, **kwargs)

    def __repr__(self) -> str:
        """A few lines (the networks' own repr is thousands): components, sizes, resolution."""
        lines = [f"{type(self).__name__}("]
        for comp in ("unet", "vae", "image_encoder"):
            n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(getattr(self, comp), nnx.Param)))
            lines.append(f"  {comp}: {type(getattr(self, comp)).__name__}, {n:,} params,")
        sched = (self.scheduler_config or {}).get("_class_name", "?")
        lines.append(f"  scheduler: {sched}, vae scaling_factor={self.vae.scaling_factor},")
        lines.append(")")
        return "\n".join(lines)

    def save_pretrained(self, path: str, *, dtype=None, variant: str | None = None,
                        format: str = "diffusers", progress: bool = False,  # noqa: A002
                        max_shard_size: int | str | None = None, push_to_hub: bool = False,
                        repo_id: str | None = None, card: CardInfo | str | None = None,
                        **push_kwargs) -> str:
        """Write a diffusers repository (`format='diffusers'`: model_index.json, unet/, vae/,
        image_encoder/, scheduler/, feature_extractor/; every folder loads with its own diffusers /
        transformers class), an orbax params checkpoint (`format='orbax'`), or one original-layout
        LDM file (`format='ldm'`, `path` ending in .safetensors, or .ckpt for a PyTorch pickle).
        `dtype` ('fp16', 'bf16', np.float16, ...) casts the saved tensors; `variant` names
        diffusers weight files; `max_shard_size` (bytes or '5GB') shards diffusers weights.

        Folders get a model card (`README.md`, `convert.model_card`); `card` is what it says
        about the weights' origin: a `CardInfo`, or the path of the pbe_jax training run they
        come from (its config and evaluation metrics go into the card). `push_to_hub=True`
        uploads the folder to `repo_id` (default: the folder's name) with huggingface_hub;
        `push_kwargs`: `token`, `private`, `commit_message`, `create_pr` (diffusers' names).
        Returns `path`."""
        np_dtype = None if dtype is None else np.dtype(cast_dtype(dtype))
        if format not in ("diffusers", "orbax", "ldm"):
            raise ValueError(f"save_pretrained: unknown format {format!r}; use 'diffusers', 'orbax' or 'ldm'")
        if variant and format != "diffusers":
            raise ValueError(f"variant names diffusers weight files; a {format} checkpoint has none")
        if max_shard_size is not None and format != "diffusers":
            raise ValueError(f"max_shard_size shards diffusers weight files; a {format} checkpoint has none")
        if format == "ldm":
            if push_to_hub:
                raise ValueError("push_to_hub uploads a folder; an LDM checkpoint is one file "
                                 "(upload it with huggingface_hub.upload_file)")
            return ldm_io.save_ldm(self, path, dtype=np_dtype)
        if format == "diffusers":
            diffusers_io.save_diffusers(self, path, dtype=np_dtype, variant=variant,
                                        max_shard_size=max_shard_size, progress=progress)
        else:
            path = orbax_io.save_orbax(self, path, dtype=np_dtype, progress=progress)
        repo_id = repo_id or (os.path.basename(os.path.normpath(path)) if push_to_hub else None)
        write_model_card(self, path, as_card_info(card), repo_id=repo_id, fmt=format)
        if push_to_hub:
            hub.push_to_hub(path, repo_id, **push_kwargs)
        return path
