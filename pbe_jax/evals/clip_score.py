"""Region CLIP score of the Paint-by-Example paper: does the edited region look like the exemplar?

Reproduces `eval_tool/clip_score/region_clip_score.py` + `test_bench_dataset.py` (commit
0c34124) with OpenAI CLIP ViT-B/32:
- result image -> `ToTensor` + CLIP `Normalize`, cropped to `[top:bottom, left:right]` where
  (top, left) and (bottom, right) are the first and last pixels equal to 255 of the grey-scale
  `Mask_bbox` in raster order (for a box mask: its corners; the end index is exclusive, so
  the box's last row and column are left out, as in the official code), then
  `T.Resize([224, 224])` on the tensor: a squash with PyTorch bilinear, no antialias
  (torchvision 0.12 of the paper's environment);
- reference -> PIL `.resize((224, 224))` (PIL's default filter: bicubic for RGB) -> RGB ->
  `ToTensor` + `Normalize`;
- score = 100 x cos(encode_image(result), encode_image(reference)), averaged over images.
We crop and resize the [0, 1] image and normalise afterwards; bilinear weights sum to one, so
this equals normalising first up to float rounding. The official script runs CLIP in fp16
(`clip.load(..., device='cuda')`); we run in the model's dtype (fp32 by default).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from pbe_jax.evals.extract import iterate_features
from pbe_jax.evals.images import Batches, load_rgb_uint8
from pbe_jax.evals.resize import resize_bilinear

CLIP_SIZE = 224


def official_crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the official crop from a `[H, W]` mask (uint8: white = 255
    is the edited region; bool: True). Slice `[top:bottom, left:right]`."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W] grey-scale, got shape {m.shape}")
    white = m if m.dtype == np.bool_ else (m == 255)
    idx = np.flatnonzero(white.ravel())
    if idx.size == 0:
        raise ValueError("mask has no white (255) pixel: no edited region to crop")
    rows, cols = np.unravel_index([idx.min(), idx.max()], m.shape)  # first and last white pixel
    top, bottom, left, right = int(rows[0]), int(rows[1]), int(cols[0]), int(cols[1])
    if bottom <= top or right <= left:
        raise ValueError(f"mask box rows [{top}, {bottom}) x cols [{left}, {right}) is empty after the "
                         "official exclusive-end crop (a one-pixel-wide region)")
    return top, bottom, left, right


def region_clip_inputs(result: np.ndarray, mask: np.ndarray, reference: Image.Image,
                       size: int = CLIP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Host preprocessing of one (result `[H, W, 3]` uint8, mask `[H, W]`, reference PIL image)
    -> (region `[size, size, 3]`, reference `[size, size, 3]`), both float32 in [0, 1]."""
    result = np.asarray(result)
    if result.ndim != 3 or result.shape[-1] != 3 or result.dtype != np.uint8:
        raise ValueError(f"result must be [H, W, 3] uint8, got {result.shape} {result.dtype}")
    if result.shape[:2] != np.shape(mask)[:2]:
        raise ValueError(f"result {result.shape[:2]} and mask {np.shape(mask)[:2]} differ in size; the "
                         "official crop indexes the result with mask coordinates")
    top, bottom, left, right = official_crop_box(mask)
    region = result[top:bottom, left:right].astype(np.float32) / np.float32(255.0)
    region = resize_bilinear(region, (size, size), "half_pixel")
    # PIL's default filter, as in the official `.resize((224, 224))` (bicubic for RGB/RGBA/L,
    # nearest for palette images); conversion to RGB after resizing, as there.
    ref = np.asarray(reference.resize((size, size)).convert("RGB"), np.float32) / np.float32(255.0)
    return region.astype(np.float32), ref


def region_clip_file_inputs(paths: tuple[str, str, str], size: int = CLIP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`region_clip_inputs` from (result, mask, reference) files. The mask is read as 8-bit grey
    (the official script uses cv2 IMREAD_GRAYSCALE; PIL 'L' agrees on black/white masks)."""
    result_path, mask_path, ref_path = paths
    with Image.open(mask_path) as m:
        mask = np.asarray(m.convert("L"))
    with Image.open(ref_path) as ref:
        return region_clip_inputs(load_rgb_uint8(result_path), mask, ref, size)


def region_clip_batches(result_paths: Sequence[str], mask_paths: Sequence[str], ref_paths: Sequence[str],
                        batch_size: int, size: int = CLIP_SIZE) -> Batches:
    """Batches of (regions `[B, size, size, 3]`, references `[B, size, size, 3]`) from files."""
    if not len(result_paths) == len(mask_paths) == len(ref_paths):
        raise ValueError(f"{len(result_paths)} results, {len(mask_paths)} masks, {len(ref_paths)} references")
    items = list(zip(result_paths, mask_paths, ref_paths))
    return Batches(items, batch_size, lambda p: region_clip_file_inputs(p, size))


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """100 x cos of paired embeddings `[N, P]`, `[N, P]` -> `[N]` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * np.sum(a * b, axis=-1)


def compute_clip_score(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    extract: Callable[[np.ndarray], np.ndarray],
    *,
    total: int | None = None,
    progress: bool = True,
) -> tuple[float, np.ndarray]:
    """Mean region CLIP score and the per-image scores `[N]`.

    `batches` yields (regions, references) `[B, 224, 224, 3]` (e.g. `region_clip_batches`);
    `extract` maps images to CLIP image embeddings (`features.clip_extractor`). Regions and
    references go through one call per batch, so one compiled program serves both (give the
    extractor `batch_size=2 * B` so that the last, shorter batch reuses it).
    """
    def embed_pair(pair):
        regions, refs = pair
        if regions.shape != refs.shape:
            raise ValueError(f"regions {regions.shape} and references {refs.shape} differ")
        emb = extract(np.concatenate([regions, refs]))
        return cosine_scores(emb[: len(regions)], emb[len(regions):])

    scores = list(iterate_features(embed_pair, batches, total=total, desc="CLIP score", progress=progress))
    if not scores:
        raise ValueError("compute_clip_score: no images")
    scores = np.concatenate(scores)
    return float(scores.mean()), scores
