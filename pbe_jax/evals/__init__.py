"""COCOEE evaluation metrics in JAX: FID, quality score (QS) and region CLIP score.

- `inception`: the FID InceptionV3 (pt_inception-2015-12-05) in NNX, pool3 features.
- `fid`: streaming float64 statistics, Frechet distance, pytorch-fid compatible `.npz` caches.
- `qs`: Gaussian-mixture log-likelihood quality score (the paper's `gmm_score_coco.py`).
- `clip_score`: region CLIP score (the paper's `region_clip_score.py`).
- `features` / `extract`: jitted, mesh-sharded feature extraction; `images`: host loading
  matching the reference scripts; `resize`: the reference bilinear resizes.

Note: the paper's released FID and QS scripts compute their statistics on CLIP ViT-B/32 image
embeddings, not Inception features; see `pbe_jax.evals.fid` and `pbe_jax.evals.qs`.
"""
from pbe_jax.evals.fid import (
    FeatureStats,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
    statistics_from_features,
)
from pbe_jax.evals.inception import InceptionV3, inception_inputs
from pbe_jax.evals.qs import GaussianMixture, compute_qs, quality_score

__all__ = [
    "FeatureStats", "compute_statistics", "fid_from_features", "frechet_distance", "load_statistics",
    "save_statistics", "statistics_from_features", "InceptionV3", "inception_inputs",
    "GaussianMixture", "compute_qs", "quality_score",
]
