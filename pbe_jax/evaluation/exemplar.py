"""Does the model follow the exemplar? Held-out edit triplets and a colour score.

Paint by Example's claim is that the object painted into the mask looks like the *reference*,
not like what the mask covered. On the demo's 'palette' scenes (`pbe_jax.data.synthetic`) this
is measurable: every object is one of 8 saturated colours on a muted background.

Triplets (`heldout_triplets`) come from held-out scenes (synthetic seed `seed`, not the
training set's): one object per scene that nothing covers, cut out by the training pipeline's
own geometry (`pbe_jax.data.transforms`: the extended-box or Bezier hole, the square crop, the
padded reference box), so the mask looks like the masks the model trained on. Two kinds:

- self: the reference is the masked object's own box (the training setting, no augmentation);
- cross: the reference is the object of another held-out scene of a *different* colour (the
  paper's setting: paint this other object here).

The painted colour of an edit is the palette colour that most of its object-coloured pixels
(chroma = max - min channel >= `CHROMA_MIN`) are nearest to, counted inside the region where
the masked object was (its tight box, within the hole); an edit with object-coloured pixels on
less than `MIN_OBJECT_SHARE` of that region painted no object (-1).

Scores (`score_edits`):
- `exemplar_following`: the share of cross-reference edits whose painted colour is the
  reference's. A model that ignores the reference and paints a random palette colour scores
  1/8 = 12.5% (`CHANCE`); one that puts the masked object back (copies the source) scores 0.
- `exemplar_closer`: the issue's looser reading, two-way: the share of cross-reference edits
  whose painted object's mean colour (object-coloured pixels of the region) is closer to the
  reference's palette colour than to the masked object's. Copying the source scores 0; a
  random palette colour about 1/2 (7/8 * 1/2 + 1/8).
- `self_following`: the same as `exemplar_following` on self references (paint the object back
  from its reference).
- `psnr_outside_mask`: PSNR (dB) of the edit against the source on the pixels the mask keeps,
  i.e. how much of the rest of the image comes back (no paste-back; it is a VAE re-synthesis).

`ExemplarEval` runs it in training: the triplets are built once, the edits go through the one
jitted edit function (`pbe_jax.inference.prepare` + `run_edit`), compiled once per run, and it
returns the scores, the frozen VAE's held-out PSNR and a grid source | mask | reference | result
(rows: self, then cross references).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from pbe_jax.data import transforms as tr
from pbe_jax.data.synthetic import PALETTE, draw_scene
from pbe_jax.evals.reconstruction import psnr, vae_psnr
from pbe_jax.inference import prepare, run_edit
from pbe_jax.metrics import image_grid

CHROMA_MIN = 80.0  # palette colours have chroma >= 160, the muted backgrounds <= ~45
MIN_OBJECT_SHARE = 0.15  # of the scored region, for an edit to count as painting an object
CHANCE = 1.0 / len(PALETTE)
MIN_TILE = 64  # grid tiles are upscaled (nearest) to at least this many pixels


@dataclasses.dataclass
class Triplets:
    """N held-out edits (self references first, then cross references), host arrays.

    source [N, R, R, 3] uint8; edit [N, R, R] bool (True = paint); keep [N, R, R] bool (pixels
    the mask keeps fully); reference [N, r, r, 3] uint8; region [N, R, R] bool (where the masked
    object was, inside the hole); ref_colour / src_colour [N] int (PALETTE indices);
    cross [N] bool (the reference is another scene's object).
    """

    source: np.ndarray
    edit: np.ndarray
    keep: np.ndarray
    reference: np.ndarray
    region: np.ndarray
    ref_colour: np.ndarray
    src_colour: np.ndarray
    cross: np.ndarray

    def __len__(self) -> int:
        return len(self.source)


def _clean_object(scene, size: tuple[int, int], data_cfg) -> tuple[int, np.ndarray] | None:
    """(index, pixel box [1, 4]) of the first object that nothing covers, whose box holds
    almost no other object and passes the training box filter; None if there is none."""
    for k in range(len(scene.boxes)):
        box, _ = tr.pixel_boxes(scene.boxes[k:k + 1], size, data_cfg)
        if not len(box) or scene.visible[k] < 0.98:
            continue
        x0, y0, x1, y1 = box[0]
        inside = scene.owner[y0:y1, x0:x1]
        if np.mean((inside >= 0) & (inside != k)) <= 0.02:
            return k, box
    return None


def _crop_box(box, crop, resolution: int) -> tuple[int, int, int, int]:
    """A full-image pixel box in output pixels of the square `crop` resized to `resolution`."""
    cx0, cy0, cx1, cy1 = crop
    sx, sy = resolution / (cx1 - cx0), resolution / (cy1 - cy0)
    x0, y0, x1, y1 = box
    clip = lambda v: int(min(max(round(v), 0), resolution))  # noqa: E731
    return clip((x0 - cx0) * sx), clip((y0 - cy0) * sy), clip((x1 - cx0) * sx), clip((y1 - cy0) * sy)


def heldout_triplets(data_cfg, num: int, seed: int = 1000) -> Triplets:
    """`num` self and `num` cross-reference triplets from the 'palette' scenes of synthetic seed
    `seed`, at `data_cfg.resolution` / `reference_size` with its box, mask and crop settings."""
    if num < 2:
        raise ValueError(f"exemplar triplets: num={num}, need at least 2 scenes to cross")
    res, rsize = int(data_cfg.resolution), int(data_cfg.reference_size)
    picks, index = [], 0
    while len(picks) < num:
        if index > 50 * num:
            raise RuntimeError(f"only {len(picks)} of {num} held-out scenes have a clean object")
        scene = draw_scene(index, seed=seed, min_side=int(data_cfg.synthetic_min_side),
                           max_side=int(data_cfg.synthetic_max_side), style="palette")
        index += 1
        h, w = scene.image.shape[:2]
        found = _clean_object(scene, (w, h), data_cfg)
        if found is None:
            continue
        k, box = found
        geom = tr.draw_geometry((w, h), box, np.random.default_rng([seed, index, 1]), data_cfg)
        source, mask = tr.render_source(scene.image, geom, res)
        reference = cv2.resize(np.ascontiguousarray(tr.reference_crop(scene.image, geom)),
                               (rsize, rsize), interpolation=cv2.INTER_LINEAR)
        edit = mask[..., 0] < 128
        x0, y0, x1, y1 = _crop_box(geom.box, geom.crop, res)
        region = np.zeros_like(edit)
        region[y0:y1, x0:x1] = True
        picks.append(dict(source=source, edit=edit, keep=mask[..., 0] == 255, reference=reference,
                          region=region & edit, colour=int(scene.colours[k])))
    # Cross: scene a gets the reference of the next scene (cyclically) of another colour.
    partner = []
    for a in range(num):
        b = next((a + s) % num for s in range(1, num)
                 if picks[(a + s) % num]["colour"] != picks[a]["colour"])
        partner.append(b)
    order = list(range(num)) * 2
    refs = list(range(num)) + partner
    return Triplets(
        source=np.stack([picks[a]["source"] for a in order]),
        edit=np.stack([picks[a]["edit"] for a in order]),
        keep=np.stack([picks[a]["keep"] for a in order]),
        reference=np.stack([picks[b]["reference"] for b in refs]),
        region=np.stack([picks[a]["region"] for a in order]),
        ref_colour=np.asarray([picks[b]["colour"] for b in refs], np.int32),
        src_colour=np.asarray([picks[a]["colour"] for a in order], np.int32),
        cross=np.arange(2 * num) >= num)


def _object_pixels(images: np.ndarray, region: np.ndarray):
    """(pixels float32 `[N, H, W, 3]` in 0..255, object mask `[N, H, W]`: the object-coloured
    pixels of `region`, or none where they cover less than MIN_OBJECT_SHARE of it)."""
    x = np.asarray(images, np.float32)
    if np.asarray(images).dtype != np.uint8:
        x = x * 255.0
    obj = np.asarray(region, bool) & (x.max(axis=-1) - x.min(axis=-1) >= CHROMA_MIN)
    enough = obj.sum(axis=(1, 2)) >= MIN_OBJECT_SHARE * np.maximum(region.sum(axis=(1, 2)), 1)
    return x, obj & enough[:, None, None]


def painted_colours(images: np.ndarray, region: np.ndarray) -> np.ndarray:
    """int32 `[N]`: the PALETTE index most object-coloured pixels of `region` `[N, H, W]` are
    nearest to, or -1 when they cover less than MIN_OBJECT_SHARE of it. `images`
    `[N, H, W, 3]` uint8 or float in [0, 1]."""
    x, obj = _object_pixels(images, region)
    nearest = np.square(x[..., None, :] - PALETTE).sum(axis=-1).argmin(axis=-1)  # [N, H, W]
    out = np.full(len(x), -1, np.int32)
    for i in np.nonzero(obj.any(axis=(1, 2)))[0]:
        out[i] = np.bincount(nearest[i][obj[i]], minlength=len(PALETTE)).argmax()
    return out


def closer_to_reference(images: np.ndarray, triplets: Triplets) -> np.ndarray:
    """bool `[N]`: the mean colour of the object-coloured pixels of the scored region is closer
    to the reference's palette colour than to the masked object's (False: no object painted)."""
    x, obj = _object_pixels(images, triplets.region)
    n = np.maximum(obj.sum(axis=(1, 2)), 1)[:, None]
    mean = (x * obj[..., None]).sum(axis=(1, 2)) / n  # [N, 3]
    to_ref = np.square(mean - PALETTE[triplets.ref_colour]).sum(axis=-1)
    to_src = np.square(mean - PALETTE[triplets.src_colour]).sum(axis=-1)
    return obj.any(axis=(1, 2)) & (to_ref < to_src)


def score_edits(edited: np.ndarray, triplets: Triplets) -> dict[str, float]:
    """The scores of the module docstring for `edited` `[N, R, R, 3]` in [0, 1] (or uint8)."""
    hit = painted_colours(edited, triplets.region) == triplets.ref_colour
    closer = closer_to_reference(edited, triplets)
    outside = psnr(edited, triplets.source, where=triplets.keep)
    return {"exemplar_following": float(hit[triplets.cross].mean()),
            "exemplar_closer": float(closer[triplets.cross].mean()),
            "self_following": float(hit[~triplets.cross].mean()),
            "psnr_outside_mask": float(np.nanmean(outside))}


def _tiles(x: np.ndarray, size: int) -> np.ndarray:
    """[N, h, w, C] -> float [N, size, size, 3] in [0, 1] (nearest upscale, grey masks)."""
    x = np.asarray(x, np.float32)
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.stack([cv2.resize(t, (size, size), interpolation=cv2.INTER_NEAREST) for t in x])


def exemplar_grid(triplets: Triplets, edited: np.ndarray, rows: int) -> np.ndarray:
    """[2 rows * T, 4 * T, 3] in [0, 1]: columns source | mask (white = paint) | reference |
    result; the first `rows` self-reference edits, then the first `rows` cross-reference ones."""
    n = len(triplets) // 2
    pick = list(range(min(rows, n))) + list(range(n, n + min(rows, n)))
    size = max(MIN_TILE, triplets.source.shape[1])
    cols = [triplets.source[pick], triplets.edit[pick].astype(np.float32), triplets.reference[pick],
            np.asarray(edited)[pick]]
    cols = [_tiles(c, size) for c in cols]
    return image_grid([np.stack([c[i] for c in cols]) for i in range(len(pick))])


class ExemplarEval:
    """The exemplar-following eval of a training run (`config.exemplar_eval`): triplets built
    once; `__call__(model)` -> (metrics {'eval/...'}, grid) through the one jitted edit function
    (the same compiled function at every call, as the batch and settings do not change)."""

    def __init__(self, config):
        ec = config.exemplar_eval
        self.triplets = heldout_triplets(config.data, int(ec.num_triplets), int(ec.seed))
        self.steps, self.guidance = int(config.sample_steps), float(config.sample_guidance)
        self.rows = int(ec.grid_rows)
        self.scheduler = ec.scheduler or None  # '' = the model's own scheduler class

    def edit(self, model) -> np.ndarray:
        """Every triplet edited by `model`: float32 `[N, R, R, 3]` in [0, 1]."""
        t = self.triplets
        inputs = prepare(model, list(t.source), list(t.edit), list(t.reference), list(range(len(t))))
        return run_edit(model, inputs, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        scheduler=self.scheduler, masked_latents="mode")

    def __call__(self, model) -> tuple[dict[str, float], np.ndarray]:
        edited = self.edit(model)
        metrics = {f"eval/{k}": v for k, v in score_edits(edited, self.triplets).items()}
        n = len(self.triplets) // 2  # the self half: each held-out scene once
        metrics["eval/vae_psnr"] = vae_psnr(model.vae, self.triplets.source[:n])
        return metrics, exemplar_grid(self.triplets, edited, self.rows)
