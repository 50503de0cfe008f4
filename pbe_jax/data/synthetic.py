"""Procedural scenes with boxes: the default data for the demo, the tests and the benchmarks.

Scene `index` of `seed` and `style` is always the same picture. Styles:

- 'varied' (the paper profile, the tests, the benchmarks): a textured background (gradient,
  stripes, checkerboard or smooth noise, plus grain) with 1-4 objects (rectangle, ellipse,
  triangle, star, polygon) of varied sizes, colours and textures (solid, stripes, dots,
  gradient, noise, shaded) that may overlap.
- 'palette' (the demo profile): the same background patterns in muted, low-saturation colours,
  with 1-3 large solid objects, each of one of the 8 saturated `PALETTE` colours (jittered by a
  few levels). An object's appearance is then its colour and its shape, which a tiny model can
  learn to carry from the reference to the hole in minutes on a CPU, and which
  `pbe_jax.evaluation.exemplar` can score (an object pixel's palette colour is unambiguous: the
  background's chroma stays far below any palette colour's).
- 'identity' (the demo's `scenes=identity`): muted, low-saturation backgrounds (the same
  patterns, or one plain tone) with 1-3 large objects. An object's identity is three
  attributes: one of the 8 `PALETTE` colours (jittered by a few levels), one of
  `PALETTE_SHAPES` and one of `PATTERNS` (the colour and a light grey in stripes, checks, dots
  or rings, or solid), coarse enough to read at the demo's 32 px. 8 x 4 x 5 = 160 identities,
  which `pbe_jax.evaluation.exemplar` / `pbe_jax.evals.identity` can score (the backgrounds'
  and the pattern grey's chroma stay far below any palette colour's).
- 'radial' (held out: no config trains on it): the 'identity' objects on a smooth radial
  gradient between a dark and a light muted tone, a background the demo never sees.
  `draw_object` draws one such object large on a plain light backdrop (an out-of-style
  reference).

Each object's box is the tight box of its drawn pixels, so later objects can occlude earlier
ones as in real annotations. `draw_scene` also returns each object's attributes (palette
colour, shape, pattern) and how much of it stays visible (for held-out evaluation triplets).
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle", "star", "polygon")
TEXTURES = ("solid", "stripes", "dots", "gradient", "noise", "shaded")
STYLES = ("varied", "palette", "identity", "radial")
# The 'identity' / 'radial' objects' identity: PALETTE colour x PALETTE_SHAPES x PATTERNS.
PALETTE_SHAPES = ("rectangle", "ellipse", "triangle", "diamond")
PATTERNS = ("solid", "stripes", "checks", "dots", "rings")
PATTERN_GREY = 205.0  # the second tone of a pattern: light, chroma ~0 (never a palette colour)
# Saturated, well separated hues (chroma max - min >= 160); the 'palette' style's object colours.
PALETTE_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
PALETTE = np.array([
    (220, 30, 30), (245, 140, 20), (235, 220, 30), (40, 170, 50),
    (30, 200, 220), (30, 60, 220), (140, 40, 210), (240, 80, 170),
], np.float32)
# Colours no demo style draws, for "your own images" the demo model never saw
# (`draw_scene(..., colours=NOVEL_PALETTE)`, `pbe_jax.tools.new_objects`): chroma >= 140, each
# 67 to 85 RGB levels from the nearest PALETTE colour and 150 or more from each other; picked
# among such colours for what the demo's own VAE (fitted on PALETTE scenes only) still
# reconstructs closest to them, since a model can only paint what its frozen VAE decodes.
NOVEL_NAMES = ("spring", "apricot", "magenta", "azure")
NOVEL_PALETTE = np.array([(20, 210, 112), (250, 195, 110), (200, 20, 175), (20, 140, 250)], np.float32)
# 'palette' backgrounds: grey level and per-channel tint ranges (chroma <= 2 * tint + grain).
_MUTED_GREY = (50, 200)
_MUTED_TINT = 15


@dataclasses.dataclass
class Scene:
    """One procedural scene. `image` `[H, W, 3]` uint8; `boxes` `[N, 4]` float32 normalised
    (x0, y0, x1, y1); `colours` `[N]` int32 index into `PALETTE` (-1 for the 'varied' style),
    `shapes` `[N]` into `PALETTE_SHAPES`, `patterns` `[N]` into `PATTERNS` (-1 but for the
    'identity' and 'radial' styles);
    `visible` `[N]` float32, the share of each object's drawn pixels that no later object
    covers; `owner` `[H, W]` int16, the object each pixel shows (-1: background)."""

    image: np.ndarray
    boxes: np.ndarray
    colours: np.ndarray
    visible: np.ndarray
    owner: np.ndarray
    shapes: np.ndarray
    patterns: np.ndarray

    def identity(self, k: int) -> tuple[int, int, int]:
        """(colour, shape, pattern) of object `k`."""
        return int(self.colours[k]), int(self.shapes[k]), int(self.patterns[k])


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: a grey level plus a small tint per channel."""
    grey = rng.uniform(*_MUTED_GREY)
    return np.clip(grey + rng.uniform(-_MUTED_TINT, _MUTED_TINT, 3), 0, 255).astype(np.float32)


def _lerp(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """`[H, W]` weights -> `[H, W, 3]` float32 colours c0 + t (c1 - c0), one plane at a time
    (numpy broadcasting over a trailing axis of 3 is ~20x slower)."""
    return cv2.merge([c0[k] + t * float(c1[k] - c0[k]) for k in range(3)])


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _radial(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The 'radial' style's background: a smooth radial gradient from a dark to a light muted
    tone around a random centre, `[H, W, 3]` float32."""
    dark = np.clip(rng.uniform(40, 90) + rng.uniform(-_MUTED_TINT, _MUTED_TINT, 3), 0, 255)
    light = np.clip(rng.uniform(170, 230) + rng.uniform(-_MUTED_TINT, _MUTED_TINT, 3), 0, 255)
    xs, ys = _grid(h, w)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    t = np.hypot(xs - cx, ys - cy) / np.float32(np.hypot(w, h))
    t = np.clip(t / max(float(t.max()), 1e-6), 0, 1)
    if rng.uniform() < 0.5:
        dark, light = light, dark
    return _lerp(t, light.astype(np.float32), dark.astype(np.float32))


def _background(rng: np.random.Generator, h: int, w: int, muted: bool = False,
                plain: bool = False) -> np.ndarray:
    """`[H, W, 3]` float32 in 0..255. `muted`: low-saturation colours and coarser stripes and
    checks (a few per image: at the demo's 32 px, finer ones alias into noise); `plain`: or one
    plain tone (a fifth of the scenes: their references show the object on a plain backdrop)."""
    kind = int(rng.integers(5 if plain else 4))
    colour = _muted if muted else _colour
    c0, c1 = colour(rng), colour(rng)
    if kind == 4:  # plain
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    if kind == 3:  # smooth noise: a coarse random grid, upsampled
        gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        if muted:
            g = np.stack([colour(rng) for _ in range(gh * gw)]).reshape(gh, gw, 3)
        else:
            g = rng.integers(0, 256, (gh, gw, 3))
        return cv2.resize(g.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    # Drawn at half size and upsampled: a quarter of the cost, the patterns are >= 20 px.
    full_h, full_w = h, w
    h, w = -(-h // 2), -(-w // 2)
    xs, ys = _grid(h, w)
    theta = rng.uniform(0, np.pi)
    proj = xs * np.float32(np.cos(theta)) + ys * np.float32(np.sin(theta))
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == 1:  # soft stripes
        period = rng.uniform(*((0.4, 0.8) if muted else (0.05, 0.25))) * min(h, w)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period)
    else:  # checkerboard
        cell = max(2, int(rng.uniform(*((0.25, 0.5) if muted else (0.05, 0.2))) * min(h, w)))
        # 1-d parities combined by broadcasting (float floor-division is slow in numpy).
        t = ((np.arange(h)[:, None] // cell) ^ (np.arange(w)[None, :] // cell)) & 1
    interp = cv2.INTER_NEAREST if kind == 2 else cv2.INTER_LINEAR
    t = cv2.resize(t.astype(np.float32), (full_w, full_h), interpolation=interp)
    return _lerp(t, c0, c1)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """`[h, w, 3]` float32 fill of one object."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    c0, c1 = _colour(rng), _colour(rng)
    if kind == "solid":
        return np.full((h, w, 3), c0, np.float32)
    if kind == "noise":
        g = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        return cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)
    xs, ys = _grid(h, w)
    if kind == "stripes":
        period = max(3.0, rng.uniform(0.1, 0.4) * min(h, w))
        t = np.floor((xs + ys * rng.uniform(-1, 1)) / (period / 2)).astype(np.int32) & 1
    elif kind == "dots":
        step = max(4, int(rng.uniform(0.15, 0.35) * min(h, w)))
        d = np.hypot((np.arange(w) % step - step / 2)[None, :],
                     (np.arange(h) % step - step / 2)[:, None])
        t = d < step / 3
    elif kind == "gradient":
        t = (xs / max(w - 1, 1)) if rng.uniform() < 0.5 else (ys / max(h - 1, 1))
    else:  # shaded: a lit sphere-like falloff
        d = np.hypot((xs - w * 0.35) / w, (ys - h * 0.35) / h)
        t = np.clip(d * 1.6, 0, 1)
    return _lerp(t.astype(np.float32), c0, c1)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """`[h, w]` uint8 mask of one random shape filling roughly an `h` x `w` box."""
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    m = np.zeros((h, w), np.uint8)
    if kind == "rectangle":
        m[:] = 1
    elif kind == "ellipse":
        cv2.ellipse(m, (w // 2, h // 2), (max(w // 2 - 1, 1), max(h // 2 - 1, 1)), 0, 0, 360, 1,
                    -1)
    else:
        if kind == "triangle":
            pts = np.array([[rng.uniform(0, 1), 0], [1, 1], [0, 1]])
        else:
            n = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == "polygon" else (
                np.arange(2 * n) * np.pi / n)
            rad = rng.uniform(0.6, 1.0, len(ang)) if kind == "polygon" else np.where(
                np.arange(2 * n) % 2 == 0, 1.0, 0.45)
            pts = 0.5 + 0.5 * np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        pts = np.round(pts * [w - 1, h - 1]).astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
    return m


def identity_mask(shape: int, h: int, w: int) -> np.ndarray:
    """`[h, w]` bool: PALETTE_SHAPES[`shape`] filling an `h` x `w` box (triangles point up)."""
    m = np.zeros((h, w), np.uint8)
    name = PALETTE_SHAPES[shape]
    if name == "rectangle":
        m[:] = 1
    elif name == "ellipse":
        cv2.ellipse(m, (w // 2, h // 2), (max(w // 2 - 1, 1), max(h // 2 - 1, 1)), 0, 0, 360, 1,
                    -1)
    else:
        pts = ([[0.5, 0], [1, 1], [0, 1]] if name == "triangle"
               else [[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]])
        cv2.fillPoly(m, [np.round(np.array(pts) * [w - 1, h - 1]).astype(np.int32)], 1)
    return m.astype(bool)


def pattern_mask(pattern: int, h: int, w: int) -> np.ndarray:
    """`[h, w]` bool: where PATTERNS[`pattern`] shows the object's colour (elsewhere the light
    PATTERN_GREY). The patterns scale with the box (3 bands, 3 x 3 checks, 2 x 2 dots, 3 rings),
    so they stay readable when the object is drawn small."""
    u = (np.arange(w, dtype=np.float32) + 0.5)[None, :] / w  # [1, w] in (0, 1)
    v = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / h  # [h, 1]
    name = PATTERNS[pattern]
    if name == "solid":
        return np.ones((h, w), bool)
    if name == "stripes":  # 3 colour bands, 2 grey ones, horizontal
        return np.broadcast_to((np.floor(v * 5).astype(np.int32) % 2) == 0, (h, w)).copy()
    if name == "checks":
        return ((np.floor(v * 3).astype(np.int32) + np.floor(u * 3).astype(np.int32)) % 2) == 0
    if name == "dots":  # grey discs on the colour, 2 x 2
        d = np.hypot((u % 0.5) - 0.25, (v % 0.5) - 0.25)
        return d > 0.14
    r = np.hypot(u - 0.5, v - 0.5) * 2  # rings: colour centre, grey ring, colour ring
    return (np.floor(r * 3).astype(np.int32) % 2) == 0


def _paint_object(region: np.ndarray, m: np.ndarray, colour: int, pattern: int,
                  rng: np.random.Generator) -> None:
    """Paint the object of mask `m` into `region` `[h, w, 3]` float32 in place."""
    h, w = m.shape
    fill = np.empty((h, w, 3), np.float32)
    fill[...] = np.clip(PATTERN_GREY + rng.uniform(-8, 8), 0, 255)
    on = pattern_mask(pattern, h, w)
    fill[on] = np.clip(PALETTE[colour] + rng.uniform(-8, 8, 3), 0, 255)
    region[m] = fill[m]


def draw_object(colour: int, shape: int, pattern: int, size: int, *, seed: int = 0,
                fill: float = 0.8) -> np.ndarray:
    """One 'identity' object drawn large (`fill` of the side) and centred on a plain light
    backdrop (an out-of-style reference): `[size, size, 3]` uint8."""
    rng = np.random.default_rng([seed, colour, shape, pattern])
    img = np.empty((size, size, 3), np.float32)
    img[...] = np.clip(rng.uniform(225, 250) + rng.uniform(-4, 4, 3), 0, 255)
    side = max(4, int(round(fill * size)))
    o = (size - side) // 2
    _paint_object(img[o:o + side, o:o + side], identity_mask(shape, side, side), colour, pattern,
                  rng)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_scene(index: int, *, seed: int = 0, min_side: int = 400, max_side: int = 640,
                    style: str = "varied") -> tuple[np.ndarray, np.ndarray]:
    """Scene `index`: image `[H, W, 3]` uint8 and boxes `[N, 4]` float32 normalised
    (x0, y0, x1, y1), H and W drawn in [min_side, max_side]."""
    scene = draw_scene(index, seed=seed, min_side=min_side, max_side=max_side, style=style)
    return scene.image, scene.boxes


def draw_scene(index: int, *, seed: int = 0, min_side: int = 400, max_side: int = 640,
               style: str = "varied", colours: np.ndarray | None = None) -> Scene:
    """Scene `index` of `seed` in `style` (see the module docstring), with its labels.
    `colours` `[K, 3]`: the 'palette' style's object colours instead of PALETTE (e.g.
    NOVEL_PALETTE); `Scene.colours` then index into it."""
    if style not in STYLES:
        raise ValueError(f"synthetic style {style!r}; expected one of {STYLES} "
                         "(config.data.synthetic_style)")
    if colours is not None and style != "palette":
        raise ValueError(f"draw_scene: colours= is for the 'palette' style, got style={style!r}")
    colours_rgb = PALETTE if colours is None else np.asarray(colours, np.float32).reshape(-1, 3)
    palette = style != "varied"  # muted backgrounds, fewer and larger objects of PALETTE colours
    identities = style in ("identity", "radial")  # objects of colour x shape x pattern
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    img = (_radial(rng, h, w) if style == "radial"
           else _background(rng, h, w, muted=palette, plain=identities))
    owner = np.full((h, w), -1, np.int16)
    boxes, colours, shapes, patterns, sizes = [], [], [], [], []
    # 'varied': object sides between 18% and 65% of the short side, so most boxes pass the area
    # filter [0.02, 0.8] and a few small ones do not. 'palette': fewer, larger objects (30% to
    # 60%), big enough to see at the demo's 32 px.
    n_max, lo, hi = (3, 0.3, 0.6) if palette else (4, 0.18, 0.65)
    for i in range(int(rng.integers(1, n_max + 1))):
        ow = max(4, int(rng.uniform(lo, hi) * min(h, w)))
        oh = max(4, int(rng.uniform(lo, hi) * min(h, w)))
        x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
        region = img[y0:y0 + oh, x0:x0 + ow]
        s = p = -1
        if identities:
            k, s, p = (int(rng.integers(n)) for n in (len(PALETTE), len(PALETTE_SHAPES),
                                                        len(PATTERNS)))
            m = identity_mask(s, oh, ow)
            _paint_object(region, m, k, p, rng)
        elif palette:
            m = _shape_mask(rng, oh, ow).astype(bool)
            k = int(rng.integers(len(colours_rgb)))
            region[m] = np.clip(colours_rgb[k] + rng.uniform(-8, 8, 3), 0, 255)
        else:
            m = _shape_mask(rng, oh, ow).astype(bool)
            region[m] = _texture(rng, oh, ow)[m]
            k = -1
        colours.append(k)
        shapes.append(s)
        patterns.append(p)
        owner[y0:y0 + oh, x0:x0 + ow][m] = i
        sizes.append(int(m.sum()))
        ys, xs = np.nonzero(m)
        boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
    # Sensor-like grain; a tiled 64 px patch costs 1/50 of a full-size normal draw.
    tile = rng.normal(0.0, 4.0, (64, 64, 3)).astype(np.float32)
    img += np.tile(tile, (-(-h // 64), -(-w // 64), 1))[:h, :w]
    out = np.clip(img, 0, 255).astype(np.uint8)
    b = np.asarray(boxes, np.float32) / np.array([w, h, w, h], np.float32)
    shown = np.bincount(owner[owner >= 0].ravel(), minlength=len(sizes))
    return Scene(image=out, boxes=b, colours=np.asarray(colours, np.int32),
                 visible=(shown / np.maximum(sizes, 1)).astype(np.float32), owner=owner,
                 shapes=np.asarray(shapes, np.int32), patterns=np.asarray(patterns, np.int32))
