"""Does the model follow the exemplar? Held-out edit triplets and a colour score.

Paint by Example's claim is that the object painted into the mask looks like the *reference*,
not like what the mask covered. On the demo's 'palette' scenes (`pbe_jax.data.synthetic`) this
is measurable: every object is one of 8 saturated colours on a muted background.

Triplets (`heldout_triplets`) come from held-out scenes (synthetic seed `seed`, not the
training set's): one object per scene that nothing covers, cut out by the training pipeline's
own geometry (`pbe_jax.data.transforms`: the extended-box or Bezier hole, the square crop, the
padded reference box), so the mask looks like the masks the model trained on. Two kinds:

- self: the reference is the masked object's own box (the training setting, no augmentation);
- cross: the reference is the object of another held-out scene of a *different* colour (and,
  where one exists, shape and pattern: the paper's setting: paint this other object here).

`heldout_triplets(..., style='identity')` builds them from the 'identity' scenes (objects of
colour x shape x pattern, the demo's `scenes=identity`); `offstyle=True` builds them in a style the demo never trains on: 'radial'
scenes, a plain rectangular hole around the object, and the reference drawn large on a plain
light backdrop (`pbe_jax.data.synthetic.draw_object`).

The painted colour of an edit is the palette colour that most of its object-coloured pixels
(chroma = max - min channel >= `CHROMA_MIN`) are nearest to (in RGB on the 'palette' scenes; on
the 'identity' and 'radial' ones by hue, `_hue`: the colour minus its grey part, unit length, so
a pattern's grey blurred into a colour keeps the colour), counted inside the region where
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
- with an identity classifier (`pbe_jax.evals.identity`): `exemplar_identity`, the share of
  cross-reference edits whose painted object has all three of the reference's attributes
  (colour, shape, pattern; chance 1/160, a copy of the source 0), `self_identity` the same on
  self references, `exemplar_shape` / `exemplar_pattern` one attribute each.

`ExemplarEval` runs it in training: the triplets are built once, the edits go through the one
jitted edit function (`pbe_jax.inference.prepare` + `run_edit`), compiled once per run, and it
returns the scores, the frozen VAE's held-out PSNR and a grid source | mask | reference | result
(rows: self, then cross references).
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from pbe_jax.data import transforms as tr
from pbe_jax.data.synthetic import PALETTE, draw_object, draw_scene
from pbe_jax.evals.identity import IdentityClassifier, fit_identity_classifier, object_crops
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
    cross [N] bool (the reference is another scene's object); ref_identity / src_identity
    [N, 3] int (colour, shape, pattern: `pbe_jax.data.synthetic.Scene.identity`; -1 for the
    'palette' style's shape and pattern); hue: the colour scores compare hues (the 'identity'
    and 'radial' styles), not RGB ('palette'); palette `[K, 3]`: the colours the indices name
    and a painted colour is matched against (None: PALETTE).
    """

    source: np.ndarray
    edit: np.ndarray
    keep: np.ndarray
    reference: np.ndarray
    region: np.ndarray
    ref_colour: np.ndarray
    src_colour: np.ndarray
    cross: np.ndarray
    ref_identity: np.ndarray
    src_identity: np.ndarray
    hue: bool = False
    palette: np.ndarray | None = None

    @property
    def colours(self) -> np.ndarray:
        return PALETTE if self.palette is None else self.palette

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


def _offstyle_geometry(size: tuple[int, int], box: np.ndarray, rng: np.random.Generator,
                       data_cfg) -> tr.Geometry:
    """The out-of-style hole: a plain rectangle, the object's tight box grown by ~4% of the
    short side (never a Bezier outline, never the training's random extension)."""
    b = tuple(int(v) for v in box[0])
    extended = tr.pad_box(b, size, max(1, round(0.04 * min(size))))
    crop = tr.square_crop(extended, size, rng, data_cfg.crop_shrink_ratio)
    return tr.Geometry(size=size, box=b, extended=extended, crop=crop,
                       reference=tr.pad_box(b, size, data_cfg.ref_pad), polygon=None)


def _picks(data_cfg, num: int, seed: int, style: str, colours: np.ndarray | None = None) -> list[dict]:
    """`num` held-out edits (one clean object per scene) of synthetic seed `seed`: the demo's
    `style` ('palette' or 'identity') scenes through the training geometry, or ('radial', out
    of style) with a rectangular hole and the reference drawn large on a plain light backdrop.
    `colours`: the 'palette' scenes' object colours (`draw_scene`)."""
    offstyle = style == "radial"
    res, rsize = int(data_cfg.resolution), int(data_cfg.reference_size)
    picks, index = [], 0
    while len(picks) < num:
        if index > 50 * num:
            raise RuntimeError(f"only {len(picks)} of {num} held-out scenes have a clean object")
        scene = draw_scene(index, seed=seed, min_side=int(data_cfg.synthetic_min_side),
                           max_side=int(data_cfg.synthetic_max_side), style=style, colours=colours)
        index += 1
        h, w = scene.image.shape[:2]
        found = _clean_object(scene, (w, h), data_cfg)
        if found is None:
            continue
        k, box = found
        rng = np.random.default_rng([seed, index, 1])
        identity = scene.identity(k)
        if offstyle:
            geom = _offstyle_geometry((w, h), box, rng, data_cfg)
            reference = draw_object(*identity, rsize, seed=seed + index)
        else:
            geom = tr.draw_geometry((w, h), box, rng, data_cfg)
            reference = cv2.resize(np.ascontiguousarray(tr.reference_crop(scene.image, geom)),
                                   (rsize, rsize), interpolation=cv2.INTER_LINEAR)
        source, mask = tr.render_source(scene.image, geom, res)
        edit = mask[..., 0] < 128
        x0, y0, x1, y1 = _crop_box(geom.box, geom.crop, res)
        region = np.zeros_like(edit)
        region[y0:y1, x0:x1] = True
        picks.append(dict(source=source, edit=edit, keep=mask[..., 0] == 255, reference=reference,
                          region=region & edit, identity=identity))
    return picks


def heldout_triplets(data_cfg, num: int, seed: int = 1000, offstyle: bool = False,
                     style: str = "palette", colours: np.ndarray | None = None) -> Triplets:
    """`num` self and `num` cross-reference triplets from the `style` ('palette' or 'identity')
    scenes of synthetic seed `seed`, at `data_cfg.resolution` / `reference_size` with its box,
    mask and crop settings; `offstyle`: from 'radial' scenes, with a rectangular hole and a
    reference drawn on a plain light backdrop (`_picks`), a style the demo never trains on.
    `colours` `[K, 3]` ('palette' only): the objects are of these colours (e.g.
    `synthetic.NOVEL_PALETTE`), and a painted colour is matched against PALETTE and these
    together (`Triplets.palette`; the colour indices count PALETTE first), so painting the
    nearest PALETTE colour instead is a miss."""
    if num < 2:
        raise ValueError(f"exemplar triplets: num={num}, need at least 2 scenes to cross")
    if style not in ("palette", "identity"):
        raise ValueError(f"exemplar triplets: style={style!r}; expected 'palette' or 'identity'")
    if colours is not None and (offstyle or style != "palette"):
        raise ValueError("exemplar triplets: colours= needs style='palette' and offstyle=False")
    style = "radial" if offstyle else style
    picks = _picks(data_cfg, num, seed, style, colours)
    ident = np.asarray([p["identity"] for p in picks], np.int32)  # [num, 3]
    palette = None
    if colours is not None:
        ident[:, 0] += len(PALETTE)
        palette = np.concatenate([PALETTE, np.asarray(colours, np.float32).reshape(-1, 3)])
    # Cross: scene a gets the reference of the next scene (cyclically) of another colour, of
    # another shape and pattern too where one exists (so that no attribute of the masked object
    # counts as the reference's).
    if len(set(ident[:, 0].tolist())) < 2:
        raise ValueError(f"exemplar triplets: the {num} held-out objects of seed {seed} all have one "
                         "colour, so none has a cross reference of another; use more triplets")
    partner = []
    for a in range(num):
        others = [(a + s) % num for s in range(1, num) if ident[(a + s) % num, 0] != ident[a, 0]]
        partner.append(next((b for b in others if (ident[b] != ident[a]).all()), others[0]))
    order = list(range(num)) * 2
    refs = list(range(num)) + partner
    return Triplets(
        source=np.stack([picks[a]["source"] for a in order]),
        edit=np.stack([picks[a]["edit"] for a in order]),
        keep=np.stack([picks[a]["keep"] for a in order]),
        reference=np.stack([picks[b]["reference"] for b in refs]),
        region=np.stack([picks[a]["region"] for a in order]),
        ref_colour=ident[refs, 0], src_colour=ident[order, 0],
        cross=np.arange(2 * num) >= num,
        ref_identity=ident[refs], src_identity=ident[order], hue=style != "palette", palette=palette)


def identity_renders(data_cfg, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth renders for the identity classifier (`pbe_jax.evals.identity`): the object
    crops of `num` held-out objects as they are (nothing edited), half through the demo's
    geometry on 'identity' scenes, half out-of-style ('radial'). (crops `[num, CROP, CROP, 3]`,
    labels `[num, 3]`)."""
    picks = (_picks(data_cfg, num - num // 2, seed, "identity")
             + _picks(data_cfg, num // 2, seed, "radial"))
    crops = object_crops(np.stack([p["source"] for p in picks]),
                         np.stack([p["region"] for p in picks]))
    return crops, np.asarray([p["identity"] for p in picks], np.int32)


def _object_pixels(images: np.ndarray, region: np.ndarray):
    """(pixels float32 `[N, H, W, 3]` in 0..255, object mask `[N, H, W]`: the object-coloured
    pixels of `region`, or none where they cover less than MIN_OBJECT_SHARE of it)."""
    x = np.asarray(images, np.float32)
    if np.asarray(images).dtype != np.uint8:
        x = x * 255.0
    obj = np.asarray(region, bool) & (x.max(axis=-1) - x.min(axis=-1) >= CHROMA_MIN)
    enough = obj.sum(axis=(1, 2)) >= MIN_OBJECT_SHARE * np.maximum(region.sum(axis=(1, 2)), 1)
    return x, obj & enough[:, None, None]


def _hue(x: np.ndarray) -> np.ndarray:
    """`[..., 3]` colours -> their chroma direction: (x - min channel), unit length. A palette
    colour mixed with any grey (a pattern's light grey, a blurred edge) keeps its direction,
    where its RGB distance would drift to a neighbouring palette colour."""
    c = x - x.min(axis=-1, keepdims=True)
    return c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-6)


def painted_colours(images: np.ndarray, region: np.ndarray, hue: bool = False,
                    palette: np.ndarray | None = None) -> np.ndarray:
    """int32 `[N]`: the index in `palette` (default PALETTE) of the colour most object-coloured
    pixels of `region` `[N, H, W]` are nearest to (in RGB; `hue`: by chroma direction, `_hue`),
    or -1 when they cover less than MIN_OBJECT_SHARE of it. `images` `[N, H, W, 3]` uint8 or
    float in [0, 1]."""
    palette = PALETTE if palette is None else palette
    x, obj = _object_pixels(images, region)
    if hue:
        nearest = (_hue(x) @ _hue(palette).T).argmax(axis=-1)  # [N, H, W]
    else:
        nearest = np.square(x[..., None, :] - palette).sum(axis=-1).argmin(axis=-1)
    out = np.full(len(x), -1, np.int32)
    for i in np.nonzero(obj.any(axis=(1, 2)))[0]:
        out[i] = np.bincount(nearest[i][obj[i]], minlength=len(palette)).argmax()
    return out


def closer_to_reference(images: np.ndarray, triplets: Triplets) -> np.ndarray:
    """bool `[N]`: the mean colour (`triplets.hue`: chroma direction) of the object-coloured
    pixels of the scored region is closer to the reference's palette colour than to the masked
    object's (False: no object painted)."""
    x, obj = _object_pixels(images, triplets.region)
    x, palette = (_hue(x), _hue(triplets.colours)) if triplets.hue else (x, triplets.colours)
    n = np.maximum(obj.sum(axis=(1, 2)), 1)[:, None]
    mean = (x * obj[..., None]).sum(axis=(1, 2)) / n  # [N, 3]
    to_ref = np.square(mean - palette[triplets.ref_colour]).sum(axis=-1)
    to_src = np.square(mean - palette[triplets.src_colour]).sum(axis=-1)
    return obj.any(axis=(1, 2)) & (to_ref < to_src)


def score_edits(edited: np.ndarray, triplets: Triplets,
                classifier: IdentityClassifier | None = None) -> dict[str, float]:
    """The scores of the module docstring for `edited` `[N, R, R, 3]` in [0, 1] (or uint8);
    with `classifier`, the identity scores too."""
    hit = painted_colours(edited, triplets.region, triplets.hue, triplets.palette) == triplets.ref_colour
    closer = closer_to_reference(edited, triplets)
    outside = psnr(edited, triplets.source, where=triplets.keep)
    out = {"exemplar_following": float(hit[triplets.cross].mean()),
           "exemplar_closer": float(closer[triplets.cross].mean()),
           "self_following": float(hit[~triplets.cross].mean()),
           "psnr_outside_mask": float(np.nanmean(outside))}
    if classifier is not None:
        same = classifier.predict(edited, triplets.region) == triplets.ref_identity  # [N, 3]
        out["exemplar_identity"] = float(same.all(axis=1)[triplets.cross].mean())
        out["self_identity"] = float(same.all(axis=1)[~triplets.cross].mean())
        out["exemplar_shape"] = float(same[triplets.cross, 1].mean())
        out["exemplar_pattern"] = float(same[triplets.cross, 2].mean())
    return out


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


def edit_triplets(model, sets: list[Triplets], *, steps: int, guidance: float,
                  scheduler: str | None = None) -> np.ndarray:
    """Every triplet of `sets`, one set after the other, edited by `model` in one batch through
    the one jitted edit function (`masked_latents='mode'`, seeds 0..N-1): float32
    `[N, R, R, 3]` in [0, 1]. `scheduler` None: the model's own."""
    source = [x for t in sets for x in t.source]
    inputs = prepare(model, source, [x for t in sets for x in t.edit],
                     [x for t in sets for x in t.reference], list(range(len(source))))
    return run_edit(model, inputs, num_inference_steps=steps, guidance_scale=guidance,
                    scheduler=scheduler, masked_latents="mode")


class ExemplarEval:
    """The exemplar-following eval of a training run (`config.exemplar_eval`): triplets (and
    `offstyle_triplets` out-of-style ones) built and the identity classifier fitted once;
    `__call__(model)` -> (metrics {'eval/...', 'eval/offstyle_...'}, grid) through the one
    jitted edit function (the same compiled function at every call: both sets go through it as
    one batch)."""

    def __init__(self, config):
        ec = config.exemplar_eval
        # The held-out scenes are of the training style ('identity' with the demo's
        # scenes=identity, else the demo's 'palette').
        style = "identity" if config.data.get("synthetic_style") == "identity" else "palette"
        self.triplets = heldout_triplets(config.data, int(ec.num_triplets), int(ec.seed),
                                         style=style)
        num_off = int(ec.get("offstyle_triplets", 0))
        self.offstyle = (heldout_triplets(config.data, num_off, int(ec.seed), offstyle=True)
                         if num_off else None)
        self.classifier = None
        if ec.get("identity", False):
            self.classifier = fit_identity_classifier(
                functools.partial(identity_renders, config.data), seed=int(ec.identity_seed))
        self.steps, self.guidance = int(config.sample_steps), float(config.sample_guidance)
        self.rows = int(ec.grid_rows)
        self.scheduler = ec.scheduler or None  # '' = the model's own scheduler class

    def _all(self) -> list[Triplets]:
        return [self.triplets] + ([self.offstyle] if self.offstyle is not None else [])

    def edit(self, model) -> np.ndarray:
        """Every triplet edited by `model` (the held-out ones, then the out-of-style ones):
        float32 `[N, R, R, 3]` in [0, 1]."""
        return edit_triplets(model, self._all(), steps=self.steps, guidance=self.guidance,
                             scheduler=self.scheduler)

    def __call__(self, model) -> tuple[dict[str, float], np.ndarray]:
        edited = self.edit(model)
        n_main = len(self.triplets)
        scores = score_edits(edited[:n_main], self.triplets, self.classifier)
        metrics = {f"eval/{k}": v for k, v in scores.items()}
        grids = [exemplar_grid(self.triplets, edited[:n_main], self.rows)]
        if self.offstyle is not None:
            off = score_edits(edited[n_main:], self.offstyle, self.classifier)
            metrics.update({f"eval/offstyle_{k}": v for k, v in off.items()})
            grids.append(exemplar_grid(self.offstyle, edited[n_main:], self.rows))
        if self.classifier is not None:
            metrics["eval/identity_classifier_accuracy"] = self.classifier.accuracy["identity"]
        n = n_main // 2  # the self half: each held-out scene once
        metrics["eval/vae_psnr"] = vae_psnr(model.vae, self.triplets.source[:n])
        return metrics, np.concatenate(grids, axis=0)
