"""Paint-by-Example inference: `PaintByExample.__call__` and what the batch CLI shares.

    edit(pipe, source, mask, reference, num_inference_steps=50, guidance_scale=5.0,
         scheduler='plms', seed=0, ...) -> list of PIL images | float array [N, H, W, 3] in [0, 1]

Host side: images are read (PIL / numpy / paths; EXIF orientation applied), the mask is
binarised at 0.5 with white = edit (the official scripts and diffusers), sizes that are not a
multiple of the model's downsampling factor (64 for SD) are padded (reflect for the source,
"keep" for the mask) and cropped back afterwards, and the reference is resized to the CLIP size
('squash' as the official script, 'center_crop' as the diffusers feature extractor).
Device side, one jitted function per (shape, steps, scheduler, CFG on/off): VAE-encode the masked
image, the keep-mask to the latent grid bilinearly (the official code; diffusers uses nearest,
which agrees on 8-px-aligned masks), CLIP-encode the reference, the guided `lax.scan` sampler,
VAE-decode. Optional `paste_back` blends the source back outside a feathered mask (the official
code and diffusers do not: the unedited region is a VAE re-synthesis with colour shift).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageOps

from pbe_jax.pipeline import CLIP_MEAN, CLIP_STD
from pbe_jax.sampler import guided_sample
from pbe_jax.schedulers import NAMES, SD_DEFAULTS, make_scheduler

ImageLike = Any  # PIL.Image | np.ndarray | str path


# ---------------------------------------------------------------------------------------------
# Host-side inputs
# ---------------------------------------------------------------------------------------------


def _open(x: ImageLike, what: str) -> Image.Image:
    if isinstance(x, (str, os.PathLike)):
        try:
            img = Image.open(x)
            img.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"{what}: cannot read image {x!r} ({e})") from None
        return ImageOps.exif_transpose(img)
    if isinstance(x, Image.Image):
        return x
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def load_rgb(x: ImageLike, what: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] (grayscale, palette, RGBA, 16-bit converted)."""
    img = _open(x, what)
    if img.mode in ("I;16", "I;16B", "I", "F"):
        a = np.asarray(img, np.float32)
        img = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"))


def load_edit_mask(x: ImageLike, what: str = "mask") -> np.ndarray:
    """bool [H, W]: True where the user painted white (the region to edit), binarised at 0.5."""
    img = _open(x, what)
    a = np.asarray(img.convert("L"), np.float32) / 255.0
    # official: mask = 1 - L/255; mask[mask < 0.5] = 0; mask[mask >= 0.5] = 1 (1 = keep)
    return (1.0 - a) < 0.5


def reference_pixels(ref: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 [h, w, 3] -> CLIP-normalised float32 [size, size, 3] with PIL bicubic."""
    img = Image.fromarray(ref)
    if mode == "squash":  # official inference.py: .resize((224, 224)), no crop
        img = img.resize((size, size), Image.BICUBIC)
    elif mode == "center_crop":  # CLIPImageProcessor: short side -> size, centre crop
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, int(w * s)), max(size, int(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"reference_preprocess must be 'squash' or 'center_crop', got {mode!r}")
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def size_multiple(pipe) -> int:
    """Pixel sides must be multiples of this (VAE factor x UNet factor; 64 for SD)."""
    vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae * unet


def pad_to_multiple(image: np.ndarray, edit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to multiples of k: the source by reflection, the mask with 'keep'."""
    h, w = edit.shape
    ph, pw = (-h) % k, (-w) % k
    if not (ph or pw):
        return image, edit
    mode = "reflect" if ph < h and pw < w else "edge"
    return (np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode),
            np.pad(edit, ((0, ph), (0, pw)), constant_values=False))


def feather(edit: np.ndarray, radius: float) -> np.ndarray:
    """float32 [H, W]: 0 outside the edit region, rising linearly to 1 at `radius` px inside."""
    if radius <= 0:
        return edit.astype(np.float32)
    dist = cv2.distanceTransform(edit.astype(np.uint8), cv2.DIST_L2, 5)  # 0 outside
    return np.clip(dist / radius, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The jitted edit
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "scheduler", "cfg", "masked_latents",
                                             "batch_sharding"))
def _edit_core(graphdef, state, image, keep, ref, seeds, latents, guidance, *, scheduler, cfg,
               masked_latents, batch_sharding):
    """image [N,H,W,3] in [-1,1], keep [N,H,W,1] (1 = keep), ref [N,R,R,3] CLIP-normalised,
    seeds [N] uint32, latents [N,h,w,C] or None -> images [N,H,W,3] in [0,1]."""
    pipe = nnx.merge(graphdef, state)
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    sf = pipe.vae.scaling_factor
    post = pipe.vae.encode(image * keep)  # hole pixels are 0 in [-1, 1] space
    if masked_latents == "mode":
        zm = post.mode()
    else:  # per-image noise, so an image does not depend on its batch-mates
        eps = jax.vmap(lambda k, m: jax.random.normal(jax.random.fold_in(k, 1), m.shape))(keys, post.mean)
        zm = post.mean + post.std * eps
    zm = zm * sf
    n, h, w, _ = zm.shape
    mask = jax.image.resize(keep, (n, h, w, 1), method="linear", antialias=False)
    if latents is None:
        c = pipe.unet.config.in_channels - zm.shape[-1] - 1
        latents = jax.vmap(lambda k: jax.random.normal(k, (h, w, c)))(keys)
    cond = pipe.image_encoder(ref)  # [N, 1, D]
    uncond = pipe.image_encoder.uncond(cond.dtype)

    def eps_fn(x, t, ctx):
        return pipe.unet(x, t, ctx)

    x0 = guided_sample(eps_fn, scheduler, latents.astype(jnp.float32), zm, mask, cond, uncond,
                       guidance if cfg else 1.0, jax.random.fold_in(keys[0], 2),
                       batch_sharding=batch_sharding)
    img = pipe.vae.decode((x0 / sf).astype(jnp.float32))
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def resolve_scheduler(pipe, scheduler: str | None, steps: int, eta: float = 0.0):
    """A name picks the class; betas and spacing come from the model's scheduler config, and
    keys that config lacks take the SD / PbE values (`SD_DEFAULTS`), not the new class's
    diffusers defaults: e.g. DDIM built from the hub's PNDM config would get diffusers'
    `clip_sample=True`, which the official (LDM) DDIM sampler does not do."""
    if scheduler is None:
        return make_scheduler(pipe.scheduler_config, steps, eta=eta)
    if scheduler not in NAMES:
        raise ValueError(f"scheduler {scheduler!r} is not one of {sorted(NAMES)}")
    cfg = {**SD_DEFAULTS, **pipe.scheduler_config, "_class_name": NAMES[scheduler]}
    return make_scheduler(cfg, steps, eta=eta)


def run_edit(pipe, image: np.ndarray, keep: np.ndarray, ref: np.ndarray, seeds: Sequence[int], *,
             num_inference_steps: int = 50, guidance_scale: float = 5.0, scheduler: str | None = "plms",
             eta: float = 0.0, latents: np.ndarray | None = None, masked_latents: str = "sample",
             mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Arrays in, float32 [N, H, W, 3] in [0, 1] out (host). Pads the batch to the mesh's batch
    size and drops the padding, so any N works on any number of devices."""
    if masked_latents not in ("sample", "mode"):
        raise ValueError(f"masked_latents must be 'sample' or 'mode', got {masked_latents!r}")
    sched = resolve_scheduler(pipe, scheduler, num_inference_steps, eta)
    n = image.shape[0]
    arrays = [image, keep, ref, np.asarray(seeds, np.uint32)] + ([latents] if latents is not None else [])
    sharding = None
    if mesh is not None:
        from pbe_jax import sharding as shd  # noqa: PLC0415

        m = shd.batch_axis_size(mesh)
        pad = (-n) % m
        arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]
        sharding = shd.batch_sharding(mesh, 4)
        arrays = [jax.device_put(a, shd.batch_sharding(mesh, a.ndim)) for a in arrays]
    graphdef, state = nnx.split(pipe)
    if mesh is not None:
        from pbe_jax import sharding as shd  # noqa: PLC0415

        state = jax.device_put(state, shd.replicated(mesh))
    image_, keep_, ref_, seeds_ = arrays[:4]
    lat_ = arrays[4] if latents is not None else None
    cfg = float(guidance_scale) != 1.0
    out = _edit_core(graphdef, state, image_, keep_, ref_, seeds_, lat_,
                     jnp.float32(guidance_scale), scheduler=sched, cfg=cfg,
                     masked_latents=masked_latents, batch_sharding=sharding)
    return np.asarray(jax.device_get(out))[:n]


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x)
    return [x]


def edit(pipe, source, mask, reference, *, num_inference_steps: int = 50, guidance_scale: float = 5.0,
         scheduler: str | None = "plms", seed: int | Sequence[int] = 0, num_images_per_prompt: int = 1,
         latents: np.ndarray | None = None, masked_latents: str = "sample", paste_back: bool = False,
         paste_back_radius: float = 8.0, reference_preprocess: str = "squash",
         output_type: str = "pil", eta: float = 0.0, mesh: jax.sharding.Mesh | None = None):
    """Paint `reference` into the white region of `mask` on `source` (see the module docstring).

    source/mask/reference: one image each or equal-length lists (PIL, numpy, paths); all sources
    of a call share one size, and each mask has its source's size. `seed`: an int (image i uses
    seed + i) or one seed per output image. `latents`: NHWC [N * num_images_per_prompt, h, w, 4]
    unit-variance noise (scaled by the scheduler's init sigma). Returns PIL images or, with
    output_type='np', float32 [N * num_images_per_prompt, H, W, 3] in [0, 1].
    """
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    srcs, masks, refs = _as_list(source), _as_list(mask), _as_list(reference)
    if not (len(srcs) == len(masks) == len(refs)):
        raise ValueError(f"got {len(srcs)} sources, {len(masks)} masks, {len(refs)} references")
    images = [load_rgb(s, f"source {i}") for i, s in enumerate(srcs)]
    edits = [load_edit_mask(m, f"mask {i}") for i, m in enumerate(masks)]
    size = images[0].shape[:2]
    for i, (im, e) in enumerate(zip(images, edits)):
        if im.shape[:2] != size:
            raise ValueError(f"source {i} is {im.shape[1]}x{im.shape[0]}, source 0 is {size[1]}x{size[0]}: "
                             "one call takes one size (the CLI groups by size)")
        if e.shape != im.shape[:2]:
            raise ValueError(f"mask {i} is {e.shape[1]}x{e.shape[0]} but its source is {im.shape[1]}x{im.shape[0]}")
        if not e.any():
            raise ValueError(f"mask {i} has no white (edit) pixels")
    k = size_multiple(pipe)
    padded = [pad_to_multiple(im, e, k) for im, e in zip(images, edits)]
    r = pipe.image_encoder.config.vision.image_size
    ref_px = [reference_pixels(load_rgb(x, f"reference {i}"), r, reference_preprocess)
              for i, x in enumerate(refs)]
    rep = lambda xs: np.repeat(np.stack(xs), num_images_per_prompt, axis=0)  # noqa: E731
    img = rep([p[0] for p in padded]).astype(np.float32) / 127.5 - 1.0
    keep = rep([(~p[1]).astype(np.float32)[..., None] for p in padded])
    ref = rep(ref_px)
    n = img.shape[0]
    seeds = [int(seed) + i for i in range(n)] if np.isscalar(seed) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} output images")
    out = run_edit(pipe, img, keep, ref, seeds, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, scheduler=scheduler, eta=eta, latents=latents,
                   masked_latents=masked_latents, mesh=mesh)
    out = out[:, :size[0], :size[1]]
    if paste_back:
        src = rep(images).astype(np.float32) / 255.0
        alpha = rep([feather(e, paste_back_radius)[..., None] for e in edits])
        out = src * (1 - alpha) + out * alpha
    if output_type == "np":
        return out
    return [Image.fromarray(np.round(o * 255).astype(np.uint8)) for o in out]
