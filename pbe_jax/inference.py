"""Paint-by-Example inference: the one jitted edit function and the one host-side preparation,
shared by `PaintByExample.__call__`, the batch CLI, evaluation and the training sample grids.

    edit(pipe, source, mask, reference, num_inference_steps=50, guidance_scale=5.0,
         scheduler=None (the model's own), seed=0, ...) -> list of PIL images | float array [N, H, W, 3] in [0, 1]

Host side (`prepare`): images are read (PIL / numpy / paths; EXIF orientation applied), the mask
is binarised at 0.5 with white = edit (the official scripts and diffusers), sizes that are not a
multiple of the model's downsampling factor (64 for SD) are padded (reflect for the source,
"keep" for the mask) and cropped back afterwards, and the reference is resized to the CLIP size
('squash' as the official script, 'center_crop' as the diffusers feature extractor).

Device side (`edit_function`): one `jax.jit` per (model graph, parameter shardings, mesh,
scheduler, CFG on/off, masked-latents mode), with explicit in / out shardings, cached; jit's own
cache adds the shapes. It VAE-encodes the masked image, resizes the keep-mask to the latent grid
bilinearly (the official code; diffusers uses nearest, which agrees on 8-px-aligned masks),
CLIP-encodes the reference, runs the guided `lax.scan` sampler and VAE-decodes. Optional
`paste_back` blends the source back outside a feathered mask (the official code and diffusers
do not: the unedited region is a VAE re-synthesis with colour shift). Optional
`mask_crop_padding` (diffusers' `padding_mask_crop`) crops a window around the mask before
`prepare`, edits it at the model's resolution and pastes it back after `finish`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import weakref
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image, ImageOps

from pbe_jax import sharding as shd
from pbe_jax.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from pbe_jax.sampler import guided_sample
from pbe_jax.schedulers import Scheduler, scheduler_for

log = logging.getLogger(__name__)

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
        except Image.DecompressionBombError as e:  # not an OSError: it would end the whole run
            raise ValueError(f"{what}: image {x!r} is too large to decode ({e})") from None
        return ImageOps.exif_transpose(img)
    if isinstance(x, Image.Image):
        return x
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(_unit_scale(arr) * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def _unit_scale(pixels) -> np.ndarray:
    """Pixels of any depth (a numpy array or a PIL image) -> float32 in [0, 1], scaled by the
    depth they are stored at, never clipped nor stretched to the image's own maximum: 16-bit
    storage (uint16, PIL 'I;16') by 65535; otherwise values within [0, 1] as they are, up to
    255 as 8-bit, up to 65535 as 16-bit."""
    sixteen = isinstance(pixels, Image.Image) and pixels.mode.startswith("I;16")
    a = np.asarray(pixels)
    sixteen = sixteen or a.dtype == np.uint16
    f = a.astype(np.float32)
    if sixteen:
        return f / 65535.0
    peak = float(f.max(initial=0))
    if peak <= 1.0:
        return f
    return f / (255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak)


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes of 16-bit / 32-bit / float pixels


def load_rgb(x: ImageLike, what: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] (grayscale, palette, RGBA, 16-bit converted)."""
    img = _open(x, what)
    if img.mode in _HIGH_DEPTH:
        img = Image.fromarray(np.round(_unit_scale(img) * 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"))


def load_edit_mask(x: ImageLike, what: str = "mask") -> np.ndarray:
    """bool [H, W]: True where the user painted white (the region to edit), binarised at 0.5.
    16-bit and float masks are scaled by their depth (a 30% grey stays 30%), not clipped."""
    img = _open(x, what)
    if img.mode in _HIGH_DEPTH:
        a = _unit_scale(img)
    else:
        a = np.asarray(img.convert("L"), np.float32) / 255.0
    # official: mask = 1 - L/255; mask[mask < 0.5] = 0; mask[mask >= 0.5] = 1 (1 = keep)
    return (1.0 - a) < 0.5


def reference_pixels(ref: np.ndarray, size: int, mode: str) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [size, size, 3] in [0, 1] with PIL bicubic (the conditioner
    normalises it with its own mean / std, models/exemplar.py)."""
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
    return np.asarray(img, np.float32) / 255.0


def size_multiple(pipe) -> int:
    """Pixel sides must be multiples of this (VAE factor x UNet factor; 64 for SD)."""
    vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae * unet


# The largest working size (pixels, after padding) an edit runs at unless told otherwise. The
# UNet's attention memory grows with the square of the pixel count: at 768 x 768 its largest
# self-attention holds 9216^2 scores x 8 heads per image, 2.7 GB in fp32 (twice with guidance),
# next to ~5 GB of fp32 SD v1 + CLIP weights: an estimate for a 16-24 GB accelerator, not a
# measurement. 3000 x 2000 would need terabytes.
MAX_PIXELS = 768 * 768
# The same budget in the UNet's terms: tokens of its largest self-attention (SD v1 at 768 x 768:
# a 96 x 96 latent grid). `max_pixels_for` turns it into pixels for any model.
MAX_ATTENTION_TOKENS = (768 // 8) ** 2
AUTO = "auto"  # max_pixels=AUTO: the limit of the model at hand (`max_pixels_for`)


def max_pixels_for(pipe) -> int:
    """The largest working size (px) `pipe` edits whole by default: the size at which its
    highest-resolution self-attention holds `MAX_ATTENTION_TOKENS` tokens. It scales with the
    VAE factor and the UNet's down blocks before its first attention: SD v1 (8x VAE, attention
    at the top level) 768 x 768; the demo (2x VAE) 192 x 192, where a 300 x 200 photo would
    hold 15,000 tokens per attention (minutes and gigabytes on a CPU)."""
    vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    blocks = list(pipe.unet.config.down_block_types)
    first_attn = next((i for i, b in enumerate(blocks) if "Attn" in b), 0)
    return MAX_ATTENTION_TOKENS * (vae * 2 ** first_attn) ** 2


def check_working_size(size: tuple[int, int], multiple: int, max_pixels: int | None,
                       model_limit: bool = False) -> None:
    """Refuse a source of `size` (H, W) whose padded working size is over `max_pixels`, before
    any compute, with a message naming the limit (None or 0: no limit; `model_limit`: the
    limit is the model's own, `max_pixels_for`)."""
    if not max_pixels:
        return
    h, w = (-(-int(s) // multiple) * multiple for s in size)
    if h * w > max_pixels:
        whose = " (this model's limit for a whole-image edit, from its latent size)" if model_limit else ""
        raise ValueError(
            f"source {size[1]}x{size[0]} would run at {w}x{h} = {w * h:,} px, over max_pixels="
            f"{max_pixels:,}{whose} (memory grows with the square of the pixel count): crop around the "
            "mask (mask_crop_padding=32 / --mask_crop_padding=32), downscale it, or raise max_pixels "
            "(--max_pixels) if the accelerator has room")


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


@dataclasses.dataclass
class EditInputs:
    """One batch of edits as the device function takes them (host arrays, N images of one
    padded size). `size` is the (H, W) before padding."""

    image: np.ndarray  # [N, H', W', 3] float32 in [-1, 1]
    keep: np.ndarray  # [N, H', W', 1] float32, 1 = keep, 0 = region to paint
    ref: np.ndarray  # [N, R, R, 3] float32 in [0, 1] (the encoder normalises)
    seeds: np.ndarray  # [N] uint32
    size: tuple[int, int]

    def __len__(self) -> int:
        return self.image.shape[0]


def prepare(pipe, images: Sequence[np.ndarray], edits: Sequence[np.ndarray], refs: Sequence[np.ndarray],
            seeds: Sequence[int], *, num_images_per_prompt: int = 1,
            reference_preprocess: str = "squash", max_pixels: int | str | None = AUTO) -> EditInputs:
    """The one host-side batch preparation: uint8 sources [H, W, 3] of one size, bool edit masks
    [H, W] (True = paint), uint8 references, one seed per output image
    (len(images) * num_images_per_prompt). Sources over `max_pixels` are refused (AUTO:
    `max_pixels_for(pipe)`)."""
    size = images[0].shape[:2]
    k = size_multiple(pipe)
    auto = max_pixels == AUTO
    check_working_size(size, k, max_pixels_for(pipe) if auto else max_pixels, model_limit=auto)
    padded = [pad_to_multiple(im, e, k) for im, e in zip(images, edits)]
    r = pipe.image_encoder.preprocess.size  # the model's feature_extractor_config
    rep = lambda xs: np.repeat(np.stack(xs), num_images_per_prompt, axis=0)  # noqa: E731
    inputs = EditInputs(
        image=rep([p[0] for p in padded]).astype(np.float32) / 127.5 - 1.0,
        keep=rep([(~p[1]).astype(np.float32)[..., None] for p in padded]),
        ref=rep([reference_pixels(x, r, reference_preprocess) for x in refs]),
        seeds=np.asarray([int(s) for s in seeds], np.uint32), size=tuple(size))
    if len(inputs.seeds) != len(inputs):
        raise ValueError(f"{len(inputs.seeds)} seeds for {len(inputs)} output images")
    return inputs


# ---------------------------------------------------------------------------------------------
# The jitted edit
# ---------------------------------------------------------------------------------------------


def _edit_body(graphdef, state, image, keep, ref, seeds, guidance, latents, *, scheduler: Scheduler,
               cfg: bool, masked_latents: str, batch_sharding):
    """image [N,H,W,3] in [-1,1], keep [N,H,W,1] (1 = keep), ref [N,R,R,3] in [0, 1],
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
    cond = pipe.image_encoder.encode(ref)  # [N, T, D]
    uncond = pipe.image_encoder.uncond(cond.dtype)
    x0 = guided_sample(pipe.unet, scheduler, latents.astype(jnp.float32), zm, mask, cond, uncond,
                       guidance if cfg else 1.0, jax.random.fold_in(keys[0], 2),
                       batch_sharding=batch_sharding)
    img = pipe.vae.decode((x0 / sf).astype(jnp.float32))
    return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# jitted edit -> the input shapes it has compiled for (to say so on the first call of each)
_COMPILED_SHAPES: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=64)
def _compiled_edit(graphdef, state_treedef, state_shardings: tuple, mesh, device, scheduler: Scheduler,
                   cfg: bool, masked_latents: str, with_latents: bool):
    state_sh = jax.tree.unflatten(state_treedef, state_shardings)
    if mesh is not None:
        batch = lambda nd: shd.batch_sharding(mesh, nd)  # noqa: E731
        out = shd.replicated(mesh)  # every process can read the images
        constrain = shd.batch_sharding(mesh, 4)
    else:
        one = jax.sharding.SingleDeviceSharding(device)
        batch = lambda nd: one  # noqa: E731
        out, constrain = one, None
    body = functools.partial(_edit_body, graphdef, scheduler=scheduler, cfg=cfg,
                             masked_latents=masked_latents, batch_sharding=constrain)
    rep = out
    in_sh = [state_sh, batch(4), batch(4), batch(4), batch(1), rep]
    if with_latents:
        in_sh.append(batch(4))
        fn = body
    else:
        fn = lambda state, image, keep, ref, seeds, guidance: body(  # noqa: E731
            state, image, keep, ref, seeds, guidance, None)
    return jax.jit(fn, in_shardings=tuple(in_sh), out_shardings=out)


def edit_function(pipe, *, scheduler: Scheduler, cfg: bool, masked_latents: str = "sample",
                  with_latents: bool = False, mesh: jax.sharding.Mesh | None = None):
    """(jitted fn, state, mesh): `fn(state, image, keep, ref, seeds, guidance[, latents])` for
    `pipe`'s params as they are placed. Params already on a mesh (training) are used in place;
    otherwise with `mesh` they are replicated onto it, else everything runs on their device.
    Built once per (graph, shardings, mesh, scheduler, cfg, masked_latents) and cached."""
    graphdef, state = nnx.split(pipe)
    leaves, treedef = jax.tree.flatten(state)
    first = getattr(leaves[0], "sharding", None)
    if isinstance(first, NamedSharding):
        mesh = first.mesh
    elif mesh is not None:
        state = jax.device_put(state, shd.replicated(mesh))
        leaves = jax.tree.leaves(state)
    device = None if mesh is not None else next(iter(first.device_set)) if first is not None else jax.devices()[0]
    fn = _compiled_edit(graphdef, treedef, tuple(x.sharding for x in leaves), mesh, device, scheduler,
                        bool(cfg), masked_latents, bool(with_latents))
    return fn, state, mesh


def run_edit(pipe, inputs: EditInputs, *, num_inference_steps: int = NUM_INFERENCE_STEPS,
             guidance_scale: float = GUIDANCE_SCALE,
             scheduler: str | None = None, eta: float = 0.0, latents: np.ndarray | None = None,
             masked_latents: str = "sample", mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """`EditInputs` in, float32 [N, H', W', 3] in [0, 1] out (host, padded size). Pads the batch
    to the mesh's batch size and drops the padding, so any N works on any number of devices."""
    if masked_latents not in ("sample", "mode"):
        raise ValueError(f"masked_latents must be 'sample' or 'mode', got {masked_latents!r}")
    sched = scheduler_for(pipe.scheduler_config, scheduler, num_inference_steps, eta)
    fn, state, mesh = edit_function(pipe, scheduler=sched, cfg=float(guidance_scale) != 1.0,
                                    masked_latents=masked_latents, with_latents=latents is not None,
                                    mesh=mesh)
    n = len(inputs)
    arrays = [inputs.image, inputs.keep, inputs.ref, inputs.seeds]
    if latents is not None:
        arrays.append(np.asarray(latents, np.float32))
    if mesh is not None:
        pad = (-n) % shd.batch_axis_size(mesh)
        arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]
        arrays = [jax.device_put(a, shd.batch_sharding(mesh, a.ndim)) for a in arrays]
    args = arrays[:4] + [np.float32(guidance_scale)] + arrays[4:]
    shapes = tuple(a.shape for a in args[:4])
    seen = _COMPILED_SHAPES.setdefault(fn, set())
    first = shapes not in seen
    if first:  # jit compiles on this call: tens of seconds for SD, with nothing else to show
        log.info("compiling the edit for %d image(s) of %dx%d, %d steps (once per size, batch and "
                 "settings; later calls reuse it)...", shapes[0][0], shapes[0][2], shapes[0][1],
                 num_inference_steps)
        t0 = time.perf_counter()
    out = fn(state, *args)
    out = out.addressable_data(0) if mesh is not None else out
    out = np.asarray(jax.device_get(out))[:n]
    if first:
        seen.add(shapes)
        log.info("compiled and ran the first edit in %.1f s", time.perf_counter() - t0)
    return out


def finish(out: np.ndarray, images: Sequence[np.ndarray], edits: Sequence[np.ndarray], *,
           num_images_per_prompt: int = 1, paste_back: bool = False,
           paste_back_radius: float = 8.0) -> np.ndarray:
    """Device output [N, H', W', 3] -> the sources' size [N, H, W, 3] in [0, 1], with the
    source pasted back outside the feathered mask when `paste_back`."""
    h, w = images[0].shape[:2]
    out = out[:, :h, :w]
    if paste_back:
        rep = lambda xs: np.repeat(np.stack(xs), num_images_per_prompt, axis=0)  # noqa: E731
        src = rep(list(images)).astype(np.float32) / 255.0
        alpha = rep([feather(e, paste_back_radius)[..., None] for e in edits])
        out = src * (1 - alpha) + out * alpha
    return out


# ---------------------------------------------------------------------------------------------
# Crop around the mask (diffusers' `padding_mask_crop`): host side, before `prepare` / after
# `finish`, so a large photo is edited at the model's resolution and only near the mask.
# ---------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 / y1 exclusive


def model_resolution(pipe) -> tuple[int, int]:
    """(H, W) the model was trained at: the UNet's `sample_size` x the VAE factor (512 for SD,
    64 for the demo); the VAE's `sample_size` when the UNet config has none."""
    vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = pipe.unet.config.sample_size
    if side is None:
        side = pipe.vae.config.sample_size
        vae = 1
    h, w = (side, side) if np.isscalar(side) else side
    return int(h) * vae, int(w) * vae


def larger_than_model(pipe, size: tuple[int, int]) -> bool:
    """Whether an (H, W) image exceeds the model's resolution on either side: where the batch
    CLI and the web demo crop around the mask by default."""
    rh, rw = model_resolution(pipe)
    return size[0] > rh or size[1] > rw


def _grow(a: int, b: int, size: int, limit: int) -> tuple[int, int]:
    """[a, b) grown to `size` (at least b - a, at most `limit`) about its centre, shifted to lie
    inside [0, limit)."""
    size = min(max(size, b - a), limit)
    a = min(max(a - (size - (b - a)) // 2, 0), limit - size)
    return a, a + size


def crop_window(edit: np.ndarray, padding: int, target: tuple[int, int]) -> Box:
    """The window to edit for a bool mask `edit` [H, W]: the mask's bounding box grown by
    `padding` px per side, then grown along one axis to the aspect of `target` (H, W) and shifted
    inside the image (diffusers' `VaeImageProcessor.get_crop_region`). Near the image's border
    the window can keep a different aspect; it is then squashed to `target`, as training squashes
    a crop that no square fits (PBE_SPEC.md section 2.4)."""
    h, w = edit.shape
    ys, xs = np.nonzero(edit)
    x0, x1 = max(int(xs.min()) - padding, 0), min(int(xs.max()) + 1 + padding, w)
    y0, y1 = max(int(ys.min()) - padding, 0), min(int(ys.max()) + 1 + padding, h)
    th, tw = target
    if (x1 - x0) * th > (y1 - y0) * tw:  # wider than the target: grow the height
        y0, y1 = _grow(y0, y1, round((x1 - x0) * th / tw), h)
    else:
        x0, x1 = _grow(x0, x1, round((y1 - y0) * tw / th), w)
    return x0, y0, x1, y1


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w, ...] -> [H, W, ...] for size (H, W): area averaging to shrink, bicubic to enlarge."""
    if x.shape[:2] == tuple(size):
        return x
    smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
    return cv2.resize(x, (size[1], size[0]), interpolation=cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)


def crop_inputs(pipe, images: Sequence[np.ndarray], edits: Sequence[np.ndarray], padding: int
                ) -> tuple[list[Box], list[np.ndarray], list[np.ndarray]]:
    """(windows, uint8 crops [R, R, 3], bool edit masks [R, R]) at the model's resolution R for
    uint8 sources [H, W, 3] and bool masks [H, W] (True = paint)."""
    if int(padding) < 0:
        raise ValueError(f"mask_crop_padding must be >= 0 px (or None for no crop), got {padding}")
    target = model_resolution(pipe)
    windows = [crop_window(e, int(padding), target) for e in edits]
    crops = [_resize(im[y0:y1, x0:x1], target) for im, (x0, y0, x1, y1) in zip(images, windows)]
    masks = [_resize(e[y0:y1, x0:x1].astype(np.float32), target) >= 0.5
             for e, (x0, y0, x1, y1) in zip(edits, windows)]
    return windows, crops, masks


def paste_windows(out: np.ndarray, images: Sequence[np.ndarray], edits: Sequence[np.ndarray],
                  windows: Sequence[Box], *, num_images_per_prompt: int = 1,
                  paste_back_radius: float = 8.0) -> list[np.ndarray]:
    """Window edits [N * k, R, R, 3] in [0, 1] (from `finish` without paste-back) -> the full
    photos [H, W, 3] in [0, 1]: each edit is resized back to its window and blended into its
    source over the feathered mask, so every pixel outside the mask (and so outside the window)
    is the source's."""
    results = []
    for i, o in enumerate(out):
        src, e = images[i // num_images_per_prompt], edits[i // num_images_per_prompt]
        x0, y0, x1, y1 = windows[i // num_images_per_prompt]
        full = src.astype(np.float32) / 255.0
        alpha = feather(e[y0:y1, x0:x1], paste_back_radius)[..., None]
        win = np.clip(_resize(np.asarray(o, np.float32), (y1 - y0, x1 - x0)), 0.0, 1.0)
        full[y0:y1, x0:x1] = full[y0:y1, x0:x1] * (1 - alpha) + win * alpha
        results.append(full)
    return results


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[..., 3] float in [0, 1] -> uint8, as the PIL outputs are quantised."""
    return np.round(x * 255).astype(np.uint8)


def _as_list(x) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x)
    return [x]


def edit(pipe, source, mask, reference, *, num_inference_steps: int = NUM_INFERENCE_STEPS,
         guidance_scale: float = GUIDANCE_SCALE,
         scheduler: str | None = None, seed: int | Sequence[int] = 0, num_images_per_prompt: int = 1,
         latents: np.ndarray | None = None, masked_latents: str = "sample", paste_back: bool = False,
         paste_back_radius: float = 8.0, mask_crop_padding: int | None = None,
         reference_preprocess: str = "squash", output_type: str = "pil", eta: float = 0.0,
         mesh: jax.sharding.Mesh | None = None, max_pixels: int | str | None = AUTO):
    """Paint `reference` into the white region of `mask` on `source` (see the module docstring).

    source/mask/reference: one image each or equal-length lists (PIL, numpy, paths); all sources
    of a call share one size, and each mask has its source's size. `seed`: an int (image i uses
    seed + i) or one seed per output image. `latents`: NHWC [N * num_images_per_prompt, h, w, 4]
    unit-variance noise (scaled by the scheduler's init sigma). `max_pixels`: sources whose
    padded working size is larger are refused (ValueError naming the limit; None = no limit;
    default AUTO: `max_pixels_for(pipe)`, 768 x 768 for SD v1, 192 x 192 for the demo).
    Returns PIL images or, with output_type='np', float32 [N * num_images_per_prompt, H, W, 3]
    in [0, 1].

    `mask_crop_padding=N` (diffusers' `padding_mask_crop`; None = off, as diffusers) edits only
    a window around the mask's bounding box grown by N px (`crop_window`), resized to the
    model's resolution (`model_resolution`; `latents` are then of that size), and blends the
    result back over the feathered mask: pixels outside the mask are the source's, whatever
    `paste_back` says.
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
    n = len(images) * num_images_per_prompt
    seeds = [int(seed) + i for i in range(n)] if np.isscalar(seed) else [int(s) for s in seed]
    refs_u8 = [load_rgb(x, f"reference {i}") for i, x in enumerate(refs)]
    work_images, work_edits = images, edits
    if mask_crop_padding is not None:
        windows, work_images, work_edits = crop_inputs(pipe, images, edits, mask_crop_padding)
    inputs = prepare(pipe, work_images, work_edits, refs_u8, seeds,
                     num_images_per_prompt=num_images_per_prompt, reference_preprocess=reference_preprocess,
                     max_pixels=max_pixels)
    out = run_edit(pipe, inputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   scheduler=scheduler, eta=eta, latents=latents, masked_latents=masked_latents, mesh=mesh)
    out = finish(out, work_images, work_edits, num_images_per_prompt=num_images_per_prompt,
                 paste_back=paste_back and mask_crop_padding is None, paste_back_radius=paste_back_radius)
    if mask_crop_padding is not None:
        out = np.stack(paste_windows(out, images, edits, windows, num_images_per_prompt=num_images_per_prompt,
                                     paste_back_radius=paste_back_radius))
    if output_type == "np":
        return out
    return [Image.fromarray(to_uint8(o)) for o in out]
