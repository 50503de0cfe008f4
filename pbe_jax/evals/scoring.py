"""Scoring a set of results with the COCOEE metrics: region CLIP score, FID, QS.

`score(items, spec)` runs the metrics whose weights `spec` gives (`plan` says which and why the
others are skipped) on results that are files or in-memory images. Loaded weights, compiled
feature extractors and FID reference statistics are memoised per process, so the training
eval hook pays for them once. Multi-process: each process extracts features for a contiguous
share of the images on its local devices; the features are all-gathered in order.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from pbe_jax.evals.clip_score import cosine_scores, region_clip_file_inputs, region_clip_inputs
from pbe_jax.evals.extract import iterate_features
from pbe_jax.evals.features import clip_extractor, inception_extractor
from pbe_jax.evals.fid import (FID_REF_SIZE, fid_reference_image, frechet_distance, load_statistics,
                               save_statistics, statistics_from_features)
from pbe_jax.evals.images import Batches, clip_file_preprocess, clip_pil_resize_crop, list_images, load_rgb_uint8
from pbe_jax.evals.inception import INPUT_SIZE, InceptionV3
from pbe_jax.evals.qs import GaussianMixture, quality_score
from pbe_jax.evals.resize import resize_bilinear
from pbe_jax.models.clip import CLIPVisionModelWithProjection
from pbe_jax.sharding import make_mesh

METRICS = ("fid", "qs", "clip_score")
FID_FEATURES = ("inception", "clip")
INCEPTION_DIM = 2048


@dataclasses.dataclass(frozen=True)
class Item:
    """One result to score: `result` is a file or uint8 `[H, W, 3]`; mask/reference are files."""

    id: str
    result: Any
    mask: str
    reference: str


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """Which metrics to compute and with which weights ('' = not given)."""

    clip_model: str = ""
    inception: str = ""
    fid_ref: str = ""
    fid_features: str = "inception"
    fid_ref_cache: str = ""
    gmm: str = ""
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.fid_features not in FID_FEATURES:
            raise ValueError(f"fid_features must be one of {FID_FEATURES}, got {self.fid_features!r}")
        for what in ("inception", "fid_ref", "gmm"):
            p = getattr(self, what)
            if p and not os.path.exists(p):
                raise FileNotFoundError(f"--{what} {p}: no such file or directory")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ---------------------------------------------------------------------------------------------
# Feature networks (memoised: the training hook reuses loaded weights and compiled programs)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _local_mesh():
    # This process's devices: each process extracts its own share (see `_features`).
    return make_mesh("data:-1", devices=jax.local_devices())


@functools.lru_cache(maxsize=4)
def _clip(path: str, batch_size: int):
    model = CLIPVisionModelWithProjection.from_pretrained(path)
    # 2 x batch: the CLIP score embeds regions and references in one call; one program for all.
    return clip_extractor(model, mesh=_local_mesh(), batch_size=2 * batch_size), model.config


@functools.lru_cache(maxsize=2)
def _inception(path: str, batch_size: int):
    return inception_extractor(InceptionV3.from_file(path), mesh=_local_mesh(), batch_size=batch_size)


@functools.lru_cache(maxsize=2)
def _gmm(path: str):
    return GaussianMixture.load(path)


# ---------------------------------------------------------------------------------------------
# Host loading per feature kind
# ---------------------------------------------------------------------------------------------


def _clip_image(x, size: int) -> np.ndarray:
    """CLIP's `preprocess` resize + crop (as the official FID/QS scripts) -> uint8 `[S, S, 3]`."""

    if isinstance(x, Image.Image):
        return clip_pil_resize_crop(x, size)
    return clip_file_preprocess(x, size) if isinstance(x, str) else clip_pil_resize_crop(Image.fromarray(x), size)


def _inception_image(x) -> np.ndarray:
    """pytorch-fid loading: RGB, `/ 255`, bilinear (half-pixel) to 299 on the host so that
    images of any size batch together -> float32 `[299, 299, 3]` in [0, 1]. The on-device
    resize of `inception_inputs` is then the identity."""

    if isinstance(x, Image.Image):
        a = np.asarray(x.convert("RGB"))
    else:
        a = load_rgb_uint8(x) if isinstance(x, str) else np.asarray(x)
    f = a.astype(np.float32) / np.float32(255.0)
    return resize_bilinear(f, (INPUT_SIZE, INPUT_SIZE), "half_pixel").astype(np.float32)


def _region_pair(item: Item, size: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item.result, str):
        return region_clip_file_inputs((item.result, item.mask, item.reference), size)
    with Image.open(item.mask) as m:
        mask = np.asarray(m.convert("L"))
    with Image.open(item.reference) as ref:
        return region_clip_inputs(np.asarray(item.result), mask, ref, size)


# ---------------------------------------------------------------------------------------------
# Multi-process: each process takes a contiguous share, results are all-gathered in order
# ---------------------------------------------------------------------------------------------


def _my_share(items: Sequence) -> list:
    p, n = jax.process_count(), len(items)
    if p == 1:
        return list(items)
    per = -(-n // p)
    padded = list(items) + [items[-1]] * (per * p - n)  # equal shares for the all-gather
    i = jax.process_index()
    return padded[i * per:(i + 1) * per]


def _gather(local: np.ndarray, n: int) -> np.ndarray:
    if jax.process_count() == 1:
        return local[:n]

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))[:n]


def _features(items: Sequence, load: Callable, extract: Callable, batch_size: int, desc: str,
              progress: bool) -> np.ndarray:
    """`extract` over `load(item)` batches -> `[N, D]` float64, all processes' shares gathered."""

    batches = Batches(_my_share(items), batch_size, load)
    local = np.concatenate(list(iterate_features(extract, batches, desc=desc, progress=progress)))
    return _gather(local.astype(np.float64), len(items))


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _feature_net(kind: str, spec: MetricSpec):
    """(extract, load one image, weights path) for 'clip' / 'inception'."""
    if kind == "clip":
        extract, cfg = _clip(spec.clip_model, spec.batch_size)
        return extract, functools.partial(_clip_image, size=cfg.image_size), spec.clip_model
    return _inception(spec.inception, spec.batch_size), _inception_image, spec.inception


def _reference_statistics(spec: MetricSpec, extract, load, weights: str, cache_dir: str | None):
    """(mu, sigma) of the FID reference set: a `.npz` as given, or a folder's (cached)."""

    if os.path.isfile(spec.fid_ref):
        return load_statistics(spec.fid_ref), spec.fid_ref
    files = list_images(spec.fid_ref)
    cache = spec.fid_ref_cache
    if not cache and cache_dir:
        key = json.dumps([spec.fid_features, os.path.abspath(spec.fid_ref), [os.path.basename(f) for f in files],
                          weights, FID_REF_SIZE])
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        cache = os.path.join(cache_dir, f"fid_ref_{spec.fid_features}_{digest}.npz")
    if cache and os.path.exists(cache):
        return load_statistics(cache), cache
    feats = _features(files, lambda p: load(fid_reference_image(p)), extract, spec.batch_size,
                      "FID reference", spec.progress)
    mu, sigma = statistics_from_features(feats)
    if cache and jax.process_index() == 0:
        save_statistics(cache, mu, sigma)
    return (mu, sigma), cache or spec.fid_ref


_REF_STATS: dict = {}  # (spec, cache_dir) -> ((mu, sigma), source): the hook computes them once


def plan(spec: MetricSpec) -> tuple[dict[str, str], dict[str, str]]:
    """({metric: feature kind or 'clip'}, {metric: why it is skipped}) from what is given."""
    todo, skipped = {}, {}
    if spec.clip_model:
        todo["clip_score"] = "clip"
    else:
        skipped["clip_score"] = "no CLIP model given (--clip_model)"
    weights = {"clip": spec.clip_model, "inception": spec.inception}
    flag = {"clip": "--clip_model", "inception": "--inception"}
    if not spec.fid_ref:
        skipped["fid"] = "no FID reference given (--fid_ref)"
    elif not weights[spec.fid_features]:
        skipped["fid"] = f"--fid_features={spec.fid_features} needs {flag[spec.fid_features]}"
    else:
        todo["fid"] = spec.fid_features
    if not spec.gmm:
        skipped["qs"] = "no GMM given (--gmm)"
    else:
        kind = "inception" if _gmm(spec.gmm).dim == INCEPTION_DIM else "clip"
        if weights[kind]:
            todo["qs"] = kind
        else:
            skipped["qs"] = f"the GMM is {_gmm(spec.gmm).dim}-d ({kind} features): needs {flag[kind]}"
    return todo, skipped


def score(items: Sequence[Item], spec: MetricSpec, *, cache_dir: str | None = None) -> dict[str, Any]:
    """Score `items`. Returns {'metrics': {name: value}, 'skipped': {name: reason},
    'protocol': {...}, 'per_image': {'clip_score': {id: value}}}; every process gets it."""
    if not items:
        raise ValueError("nothing to score: no results matched the bench")
    todo, skipped = plan(spec)
    metrics: dict[str, float] = {}
    protocol: dict[str, Any] = {}
    per_image: dict[str, dict[str, float]] = {}
    if "clip_score" in todo:
        extract, cfg = _clip(spec.clip_model, spec.batch_size)
        size = cfg.image_size

        def pair_scores(pair):
            regions, refs = pair
            emb = extract(np.concatenate([regions, refs]))
            return cosine_scores(emb[:len(regions)], emb[len(regions):])[:, None]

        s = _features(items, lambda it: _region_pair(it, size), pair_scores, spec.batch_size, "CLIP score",
                      spec.progress)[:, 0]
        metrics["clip_score"] = float(s.mean())
        per_image["clip_score"] = {it.id: float(v) for it, v in zip(items, s)}
        protocol["clip_score"] = {"model": spec.clip_model, "image_size": size}
    feats: dict[str, np.ndarray] = {}
    for metric in ("fid", "qs"):
        if metric not in todo:
            continue
        kind = todo[metric]
        extract, load, weights = _feature_net(kind, spec)
        if kind not in feats:
            feats[kind] = _features(items, lambda it: load(it.result), extract, spec.batch_size,
                                    f"{kind} features", spec.progress)
        if metric == "fid":
            if len(items) < 2:
                skipped["fid"] = "FID needs at least 2 results"
                continue
            key = (spec, cache_dir)
            if key not in _REF_STATS:
                _REF_STATS[key] = _reference_statistics(spec, extract, load, weights, cache_dir)
            (mu_ref, sigma_ref), source = _REF_STATS[key]
            if mu_ref.shape[0] != feats[kind].shape[1]:
                raise ValueError(f"FID reference {source} has {mu_ref.shape[0]}-d statistics but "
                                 f"--fid_features={kind} gives {feats[kind].shape[1]}-d features")
            mu, sigma = statistics_from_features(feats[kind])
            metrics["fid"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            protocol["fid"] = {"features": kind, "weights": weights, "reference": source}
        else:
            metrics["qs"] = quality_score(_gmm(spec.gmm).score_samples(feats[kind]))
            protocol["qs"] = {"features": kind, "weights": weights, "gmm": spec.gmm}
    return {"metrics": metrics, "skipped": skipped, "protocol": protocol, "per_image": per_image}
