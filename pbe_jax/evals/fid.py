"""Frechet distance between two feature distributions (FID) and its cached statistics.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)), with (mu, S) the mean and
covariance (ddof=1, like `np.cov`) of per-image features, accumulated in float64.

Which features: standard FID uses InceptionV3 pool3 (pytorch-fid; `pbe_jax.evals.inception`),
and that is what `features.inception_extractor` gives. NOTE: the Paint-by-Example authors'
released `eval_tool/fid/fid_score.py` + `eval_tool/fid/inception.py` (commit 0c34124) do NOT
run Inception: the Inception forward is commented out and `InceptionV3.forward` returns
`clip_model.encode_image(x)` of OpenAI CLIP ViT-B/32 (512-d, fp16 on GPU) on images loaded
through CLIP's `preprocess`. The paper's COCOEE "FID" (3.18) is therefore a Frechet distance on
CLIP image embeddings; `features.clip_extractor` + `images.clip_pil_preprocess` reproduce that
protocol. The functions here are the same for both.

`.npz` caches use pytorch-fid's keys `mu` and `sigma`, so its cached statistics load here and
ours load there.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Iterable

import numpy as np
import scipy.linalg
from PIL import Image

from pbe_jax.evals.extract import iterate_features
from pbe_jax.outputs import atomic_write

FID_REF_SIZE = 512  # scripts/create_square_gt_for_fid.py: Resize(512) + CenterCrop(512)

METHODS = ("eigh", "sqrtm")


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64.

    Batches merge by the pairwise update of Chan et al. (per-batch centred sums of squares plus
    a correction for the shift of the mean), which does not lose digits the way
    `sum(x x^T) - n mu mu^T` does when the mean is large against the spread.
    """

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of outer products of deviations [D, D]

    def update(self, features: np.ndarray) -> "FeatureStats":
        """Add a batch of features `[N, D]`."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dim {x.shape[1]} differs from earlier batches ({self.mean.shape[0]})")
        nb = x.shape[0]
        if nb == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return self
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n
        return self

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("FeatureStats: no features added")
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 samples, have {self.n}")
        return self.m2 / (self.n - 1)


def statistics_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`features` `[N, D]` -> (mu `[D]`, sigma `[D, D]`) in float64."""
    stats = FeatureStats().update(features)
    return stats.mu, stats.sigma


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write `mu`/`sigma` to `path` (a `.npz` readable by pytorch-fid)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()  # a file object: np.savez would append '.npz' to a bare path
    np.savez(buf, mu=mu, sigma=sigma)
    atomic_write(path, buf.getvalue())


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a `.npz` with keys `mu` and `sigma` (pytorch-fid's cache format)."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"{path}: no {missing} in the statistics file (found keys {f.files})")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    _check_stats(mu, sigma, path)
    return mu, sigma


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")


def compute_statistics(
    images: Iterable[np.ndarray],
    extract: Callable[[np.ndarray], np.ndarray],
    *,
    cache: str | None = None,
    total: int | None = None,
    progress: bool = True,
    desc: str = "FID statistics",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of `extract(batch)` over an iterable of image batches, streamed in float64.

    `extract` is e.g. a `FeatureExtractor` from `pbe_jax.evals.features`. With `cache`, an
    existing `.npz` there is loaded instead of computing (delete it to recompute), and a fresh
    result is written there.
    """
    if cache is not None and os.path.exists(cache):
        return load_statistics(cache)
    stats = FeatureStats()
    for feats in iterate_features(extract, images, total=total, desc=desc, progress=progress):
        stats.update(feats)
    mu, sigma = stats.mu, stats.sigma
    if cache is not None:
        save_statistics(cache, mu, sigma)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a covariance matrix; tiny negative eigenvalues (rounding of
    a rank-deficient estimate) are set to zero, clearly negative ones are an error."""
    w, v = scipy.linalg.eigh((sigma + sigma.T) / 2)
    if w.min() < -1e-6 * max(abs(w).max(), 1e-300):
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {w.min():.3e}, "
                         f"largest {w.max():.3e})")
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # S1 S2 is similar to sqrt(S1) S2 sqrt(S1) (AB and BA share eigenvalues), which is
    # symmetric PSD: Tr sqrt(S1 S2) = sum of square roots of its (real, >= 0) eigenvalues. No
    # complex arithmetic, no failure on singular products.
    root1 = _psd_sqrt(sigma1, "sigma1")
    m = root1 @ sigma2 @ root1
    ev = scipy.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    # pytorch-fid's `calculate_frechet_distance`, for bit-level comparison with its numbers.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {np.abs(covmean.imag).max():.3e}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: str = "eigh",
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    `method='eigh'` (default): symmetric eigendecompositions, robust to singular covariances
    (fewer samples than dimensions). `method='sqrtm'`: pytorch-fid's scipy `sqrtm(S1 S2)` with
    its `eps * I` fallback and imaginary-part check. The two agree to ~1e-9 relative on
    well-conditioned inputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray, **kw) -> float:
    """FID between two feature sets `[N1, D]`, `[N2, D]` (kwargs: see `frechet_distance`)."""
    mu1, s1 = statistics_from_features(features1)
    mu2, s2 = statistics_from_features(features2)
    return frechet_distance(mu1, s1, mu2, s2, **kw)


def fid_reference_image(path: str, size: int = FID_REF_SIZE) -> Image.Image:
    """One FID reference image as `scripts/create_square_gt_for_fid.py` makes it: torchvision
    `Resize(size)` on the PIL image (short side to `size` with PIL's antialiased *bilinear*, the
    long side truncated; untouched when the short side already is `size`), then
    `CenterCrop(size)`. Idempotent: a prepared 512 x 512 image comes back unchanged, so a folder
    of raw COCO test2017 images and a prepared folder give the same statistics.
    (We convert to RGB first; the official script keeps grey images grey, which the FID loaders
    then replicate to RGB: the same pixels.)"""
    with Image.open(path) as raw:
        img = raw.convert("RGB")
    w, h = img.size
    if min(w, h) != size:
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((new_w, new_h), Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision center_crop
    return img.crop((left, top, left + size, top + size))
