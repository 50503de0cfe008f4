"""Paint-by-Example's self-reference transforms (PBE_SPEC.md section 2), per sample.

Two stages, so that no pixel is decoded or warped that the sample does not use:
1. `draw_geometry`: every random choice about *where* (the box, its extension, the mask polygon,
   the square crop, the reference window), in integer pixels of the full-size displayed image.
   It needs only the image size, so it runs before decoding.
2. `render_source` / `augment_reference`: pixels. The source crop and its mask are cut from
   the (possibly reduced-size) decoded image and resized once to `resolution`; the mask is drawn
   only inside the crop window. The reference is cut, squashed to `reference_size` and augmented
   as the official albumentations Compose (flip, rotate, blur, elastic). With
   `config.data.ref_backdrop_prob` > 0 (off in the paper's recipe), where the object's mask is
   known, that share of references is the object alone on a plain backdrop instead of its padded
   box (`backdrop_reference`, as AnyDoor's background-removed references), augmented the same.

Random draws come from the `np.random.Generator` handed in (grain seeds it per element and per
epoch), in the official code's order. Integer draws mirror python `random.randint(a, b)`
(inclusive) and the official `int(...)` truncations.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from pbe_jax.data.decode import BadImage

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1 / y1 exclusive (numpy slicing)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where one sample comes from, in pixels of the full-size displayed image `size` (W, H).

    `polygon` `[K, 2]` (x, y) is the Bezier hole outline, or None for the extended-box hole;
    `hole` `[H, W]` bool (full size), when set, is a given object mask used as the hole instead
    (`config.data.use_given_masks`); `box_index` is the row of `box` in the boxes
    `draw_geometry` chose it from.
    """

    size: tuple[int, int]
    box: Box
    extended: Box
    crop: Box
    reference: Box
    polygon: np.ndarray | None
    hole: np.ndarray | None = None
    box_index: int = 0


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """python `random.randint(lo, hi)`: inclusive on both ends."""
    return int(rng.integers(lo, hi, endpoint=True))


def extend_box(box: Box, size: tuple[int, int], rng: np.random.Generator, ratio: float) -> Box:
    """Move each side outward by randint(0, int(ratio * free space on that side))."""
    x0, y0, x1, y1 = box
    w, h = size
    return (x0 - _randint(rng, 0, int(ratio * x0)),
            y0 - _randint(rng, 0, int(ratio * y0)),
            x1 + _randint(rng, 0, int(ratio * (w - x1))),
            y1 + _randint(rng, 0, int(ratio * (h - y1))))


def bezier_polygon(box: Box, extended: Box, rng: np.random.Generator, num_samples: int,
                   jitter: int) -> np.ndarray:
    """The official "arbitrary shape" hole: each edge of `box` is a quadratic Bezier whose
    middle node is pushed out to the `extended` side, sampled at s = i / (num_samples + 2),
    i = 1..num_samples (0.05 .. 0.90 for 18), each point jittered by randint(-jitter, jitter) px
    in x and y.

    As the official loop, a point is dropped when its un-jittered x or y already occurred on the
    same curve. The points are computed with the same floating-point operations as
    `bezier.Curve.evaluate` (bit-exact, tested), because that rule compares floats exactly: on a
    curve symmetric in y (top, bottom) or x (left, right), s and 1 - s often give the very same
    value, so about a quarter of the 72 points are dropped, unevenly, as in the official masks.

    Returns `[K, 2]` float64 (x, y), clockwise from the top-left, K <= 4 * num_samples.
    """
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = extended
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    curves = (((x0, y0), (mx, ey0), (x1, y0)),  # top, left to right
              ((x1, y0), (ex1, my), (x1, y1)),  # right, top to bottom
              ((x1, y1), (mx, ey1), (x0, y1)),  # bottom, right to left
              ((x0, y1), (ex0, my), (x0, y0)))  # left, bottom to top
    s = np.arange(1, num_samples + 1) * (1.0 / (num_samples + 2))
    points = []
    for p0, p1, p2 in curves:
        xs = _bezier2(p0[0], p1[0], p2[0], s)
        ys = _bezier2(p0[1], p1[1], p2[1], s)
        seen_x, seen_y = set(), set()
        for x, y in zip(xs.tolist(), ys.tolist()):
            if x in seen_x or y in seen_y:
                continue
            points.append((x + _randint(rng, -jitter, jitter), y + _randint(rng, -jitter, jitter)))
            seen_x.add(x)
            seen_y.add(y)
    return np.asarray(points, np.float64)


def _bezier2(n0: float, n1: float, n2: float, s: np.ndarray) -> np.ndarray:
    """Quadratic Bezier at `s` in `bezier`'s barycentric Horner form
    (`evaluate_multi_barycentric`), operation for operation."""
    l1 = 1.0 - s
    return (l1 * float(n0) + (2.0 * s) * float(n1)) * l1 + (s * s) * float(n2)


def square_crop(extended: Box, size: tuple[int, int], rng: np.random.Generator,
                shrink_ratio: float) -> Box:
    """A square window holding the `extended` box, shrunk on all sides by
    randint(0, int(shrink_ratio * smallest margin)). As the official code, the whole image is
    used (and later squashed to a square) when W == H or no square window fits the box."""
    w, h = size
    if w == h:
        return (0, 0, w, h)
    # Solve the W > H case; the W < H case is the same on the transposed image.
    tall = h > w
    if tall:
        extended = (extended[1], extended[0], extended[3], extended[2])
        w, h = h, w
    ex0, ey0, ex1, ey1 = extended
    left_most = max(0, ex1 - h)
    right_most = min(w, ex0 + h) - h
    if right_most <= left_most:
        crop = (0, 0, w, h)
    else:
        left = _randint(rng, left_most, right_most)
        free = min(ex0 - left, ey0, left + h - ex1, h - ey1)
        s = _randint(rng, 0, int(shrink_ratio * free))
        crop = (left + s, s, left + h - s, h - s)
    if tall:
        crop = (crop[1], crop[0], crop[3], crop[2])
    return crop


def pad_box(box: Box, size: tuple[int, int], pad: int) -> Box:
    """The reference window: `box` grown by up to `pad` px per side, clamped to the image."""
    x0, y0, x1, y1 = box
    w, h = size
    return (x0 - min(pad, x0), y0 - min(pad, y0), x1 + min(pad, w - x1), y1 + min(pad, h - y1))


def draw_geometry(size: tuple[int, int], boxes: np.ndarray, rng: np.random.Generator,
                  cfg) -> Geometry:
    """All random geometry of one sample.

    Args:
      size: (W, H) of the displayed full-size image.
      boxes: `[N, 4]` int (x0, y0, x1, y1) valid boxes in pixels (N >= 1).
      cfg: the `config.data` block.
    """
    box_index = int(rng.integers(len(boxes)))
    box = tuple(int(v) for v in boxes[box_index])
    reference = pad_box(box, size, cfg.ref_pad)
    extended = extend_box(box, size, rng, cfg.box_extend_ratio)
    polygon = None
    if rng.uniform() < cfg.arbitrary_mask_prob:
        polygon = bezier_polygon(box, extended, rng, cfg.bezier_samples, cfg.bezier_jitter)
    crop = square_crop(extended, size, rng, cfg.crop_shrink_ratio)
    return Geometry(size=size, box=box, extended=extended, crop=crop, reference=reference,
                    polygon=polygon, box_index=box_index)


def _scaled(box: Box, sx: float, sy: float, shape: tuple[int, int]) -> Box:
    """`box` in full-size pixels -> pixels of an image decoded at scale (sx, sy), `[H, W]`."""
    h, w = shape
    x0 = min(max(int(round(box[0] * sx)), 0), w - 1)
    y0 = min(max(int(round(box[1] * sy)), 0), h - 1)
    x1 = min(max(int(round(box[2] * sx)), x0 + 1), w)
    y1 = min(max(int(round(box[3] * sy)), y0 + 1), h)
    return x0, y0, x1, y1


def render_source(image: np.ndarray, geom: Geometry, resolution: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Crop the square window, draw the hole, resize both to `resolution` (bilinear, no
    antialias, as torchvision 0.12 `T.Resize` on tensors in the official code).

    Args:
      image: `[h, w, 3]` uint8, the displayed image decoded at any scale.
    Returns:
      image `[R, R, 3]` uint8, mask `[R, R, 1]` uint8 (255 keep, 0 hole, soft at the edge).
    """
    h, w = image.shape[:2]
    sx, sy = w / geom.size[0], h / geom.size[1]
    cx0, cy0, cx1, cy1 = _scaled(geom.crop, sx, sy, (h, w))
    crop = image[cy0:cy1, cx0:cx1]
    mask = np.full(crop.shape[:2], 255, np.uint8)
    if geom.hole is not None:
        # cut at full size, then brought to the decoded crop's size with the image
        x0, y0, x1, y1 = geom.crop
        mask = np.where(geom.hole[y0:y1, x0:x1], 0, 255).astype(np.uint8)
    elif geom.polygon is None:
        ex0, ey0, ex1, ey1 = _scaled(geom.extended, sx, sy, (h, w))
        mask[max(ey0 - cy0, 0):max(ey1 - cy0, 0), max(ex0 - cx0, 0):max(ex1 - cx0, 0)] = 0
    else:
        # Subpixel vertices (shift=4 fixed point) so that reduced-size decoding keeps the shape.
        pts = geom.polygon * (sx, sy) - (cx0, cy0)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 0, cv2.LINE_8, shift=4)
    size = (resolution, resolution)
    out_image = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
    out_mask = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
    return out_image, out_mask[..., None]


def reference_crop(image: np.ndarray, geom: Geometry) -> np.ndarray:
    """The padded box `[h, w, 3]` (a view) of `image` decoded at any scale."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _scaled(geom.reference, w / geom.size[0], h / geom.size[1], (h, w))
    return image[y0:y1, x0:x1]


def backdrop_reference(image: np.ndarray, object_mask: np.ndarray, geom: Geometry,
                       rng: np.random.Generator, cfg) -> np.ndarray | None:
    """The object alone on a plain backdrop, as AnyDoor feeds its (background-removed)
    references: the pixels of `object_mask` inside the chosen box, pasted with their aspect kept
    into a square canvas whose side they fill by a random share in [`ref_backdrop_fill_min`,
    `ref_backdrop_fill_max`], at a random place on it; the rest is one plain tone (a random grey
    level with a slight tint). `augment_reference` then treats the canvas as any reference crop.

    Args:
      image: `[h, w, 3]` uint8, the displayed image decoded at any scale.
      object_mask: `[H, W]` bool in full-size pixels (`geom.size`): the object's visible pixels.

    Returns:
      the canvas `[S, S, 3]` uint8 at the decoded image's scale, or None when the mask holds no
      pixel of the box (the caller keeps the usual crop).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _scaled(geom.box, w / geom.size[0], h / geom.size[1], (h, w))
    bx0, by0, bx1, by1 = geom.box
    m = object_mask[by0:by1, bx0:bx1]
    if not m.any():
        return None
    bw, bh = x1 - x0, y1 - y0
    if m.shape != (bh, bw):
        m = cv2.resize(m.astype(np.uint8), (bw, bh), interpolation=cv2.INTER_NEAREST).astype(bool)
    fill = rng.uniform(cfg.ref_backdrop_fill_min, cfg.ref_backdrop_fill_max)
    side = max(bw, bh, int(np.ceil(max(bw, bh) / fill)))
    tone = np.clip(rng.uniform(0, 255) + rng.uniform(-8, 8, 3), 0, 255)
    ox, oy = _randint(rng, 0, side - bw), _randint(rng, 0, side - bh)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[...] = np.round(tone).astype(np.uint8)
    canvas[oy:oy + bh, ox:ox + bw][m] = image[y0:y1, x0:x1][m]
    return canvas


def augment_reference(crop: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """Squash to `reference_size`, then HorizontalFlip, Rotate (reflect-101 border), Blur,
    ElasticTransform with the official probabilities (albumentations 0.4.3 order).

    Returns `[R, R, 3]` uint8 (CLIP normalisation happens on device, batch.normalize_batch).
    """
    r = cfg.reference_size
    ref = cv2.resize(crop, (r, r), interpolation=cv2.INTER_LINEAR)
    if rng.uniform() < cfg.ref_flip_prob:
        ref = np.ascontiguousarray(ref[:, ::-1])
    if rng.uniform() < cfg.ref_rotate_prob:
        angle = rng.uniform(-cfg.ref_rotate_limit, cfg.ref_rotate_limit)
        m = cv2.getRotationMatrix2D((r / 2, r / 2), angle, 1.0)
        ref = cv2.warpAffine(ref, m, (r, r), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    if rng.uniform() < cfg.ref_blur_prob:
        k = int(rng.choice(np.arange(cfg.ref_blur_min, cfg.ref_blur_max + 1, 2)))
        ref = cv2.blur(ref, (k, k))
    if rng.uniform() < cfg.ref_elastic_prob:
        ref = elastic_transform(ref, rng, cfg.elastic_alpha, cfg.elastic_sigma,
                                cfg.elastic_alpha_affine)
    return ref


def smooth_displacement(shape: tuple[int, int], rng: np.random.Generator, sigma: float
                        ) -> np.ndarray:
    """Gaussian-smoothed uniform(-1, 1) noise `[H, W]` float32, as albumentations'
    `gaussian_filter(rand * 2 - 1, sigma)`, in distribution.

    Departure, for speed: with sigma 50 the exact filter costs ~30 ms at 224 px. The field is
    made on a grid `f = sigma // 4` times coarser (blurred with sigma / f, then bilinearly
    upsampled) and its amplitude divided by f: a blurred white-noise field's std scales as
    1 / (filter width in samples), so this keeps its std and correlation length.
    """
    h, w = shape
    f = max(1, int(sigma // 4))
    pad = int(f > 1)  # one extra coarse sample so the upsampled field covers the last pixels
    gh, gw = -(-h // f) + pad, -(-w // f) + pad
    noise = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigma / f, borderType=cv2.BORDER_REFLECT)
    if f > 1:
        field = cv2.resize(field, (gw * f, gh * f), interpolation=cv2.INTER_LINEAR)[:h, :w] / f
    return field


def elastic_transform(img: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float,
                      alpha_affine: float) -> np.ndarray:
    """albumentations 0.4.3 `ElasticTransform`: a random affine (three points moved by up to
    `alpha_affine` px) then a smooth displacement of `alpha` x the field, both bilinear with a
    reflect-101 border.

    Departure, for speed: the two warps are composed into one `cv2.remap` (one bilinear
    resampling instead of two).
    """
    h, w = img.shape[:2]
    # albumentations builds the points from (height, width) although cv2 reads them as (x, y);
    # kept, it only matters for non-square references.
    center = np.float32((h, w)) // 2
    side = min(h, w) // 3
    pts1 = np.float32([center + side, [center[0] + side, center[1] - side], center - side])
    pts2 = pts1 + rng.uniform(-alpha_affine, alpha_affine, size=pts1.shape).astype(np.float32)
    inv = cv2.invertAffineTransform(cv2.getAffineTransform(pts1, pts2))  # dst -> src
    dx = smooth_displacement((h, w), rng, sigma) * alpha
    dy = smooth_displacement((h, w), rng, sigma) * alpha
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs += dx
    ys += dy
    map_x = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    map_y = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    return cv2.remap(img, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT_101)


def pixel_boxes(boxes: np.ndarray, size: tuple[int, int], cfg, return_index: bool = False
                ) -> tuple[np.ndarray, dict] | tuple[np.ndarray, dict, np.ndarray]:
    """Normalised `[N, 4]` (x0, y0, x1, y1) -> valid integer pixel boxes `[M, 4]` of an image of
    `size` (W, H): clipped to the image, degenerate ones (non-finite, inverted, thinner than
    `min_box_side` px) dropped, then the area filter [min_box_area, max_box_area].

    Returns the boxes and counts {'box_clipped': n, 'box_degenerate': n}; `return_index`: also
    the rows of `boxes` they come from, `[M]` int.
    """
    w, h = size
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    clipped = finite & ((b < -1e-6) | (b > 1 + 1e-6)).any(axis=1)
    b = np.clip(b, 0.0, 1.0)
    # The official read_bbox.py writes int(normalised * int(size)).
    px = (b * np.array([w, h, w, h])).astype(np.int64)
    pw, ph = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
    ok = finite & (pw >= cfg.min_box_side) & (ph >= cfg.min_box_side)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = ok & (area >= cfg.min_box_area) & (area <= cfg.max_box_area)
    counts = {"box_clipped": int((clipped & ok).sum()), "box_degenerate": int((~ok).sum())}
    if return_index:
        return px[keep], counts, np.flatnonzero(keep)
    return px[keep], counts


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The bounding box of a `[H, W]` bool object mask, normalised `[1, 4]` (x0, y0, x1, y1),
    x1 / y1 exclusive. Raises BadImage('mask_empty') when the mask holds no object pixel."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        raise BadImage("mask_empty", f"{mask.shape[1]}x{mask.shape[0]} mask with no white pixel")
    h, w = mask.shape
    return np.array([[xs[0] / w, ys[0] / h, (xs[-1] + 1) / w, (ys[-1] + 1) / h]], np.float32)


def pick_reduce(geom: Geometry, cfg) -> int:
    """The largest JPEG reduction in (1, 2, 4, 8) that still gives the crop at least
    `resolution` px and the reference window at least `reference_size` px (or its full size,
    when it is smaller), so reduced decoding never lowers what the sample sees."""
    if not cfg.decode_reduced:
        return 1
    c = geom.crop
    r = geom.reference
    need = [(min(c[2] - c[0], c[3] - c[1]), cfg.resolution),
            (r[2] - r[0], cfg.reference_size), (r[3] - r[1], cfg.reference_size)]
    best = 1
    for f in (2, 4, 8):
        if all(have >= target * f for have, target in need):
            best = f
    return best
