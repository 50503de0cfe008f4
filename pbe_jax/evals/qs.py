"""Quality score (QS): log-likelihood of image features under a pre-fitted Gaussian mixture.

The Paint-by-Example authors' `eval_tool/gmm/gmm_score_coco.py` scores each image with
`gmm.score_samples(features)` of a full-covariance sklearn `GaussianMixture`
(`coco2017_gmm_k20`, 20 components), maps the log-likelihood through `(ll - 0) / (300 - 0)`,
clips to [0, 1], averages and multiplies by 100.

Features (what the released code does, commit 0c34124): images go through OpenAI CLIP's
ViT-B/32 `preprocess` (bicubic resize of the short side to 224, centre crop, CLIP
normalisation) and, despite the file's `InceptionV3` class, its `forward` returns
`clip_model.encode_image(x)`: the 512-d CLIP ViT-B/32 image embedding (in fp16 on GPU), not
Inception pool3. So the GMM holds 512-d means; use `features.clip_extractor` with
`images.clip_pil_preprocess` to reproduce the paper's QS. The scorer below takes any feature
dimension and checks that it matches the mixture.

The mixture is read from an `.npz` (never from a pickle at load time). To convert the authors'
pickled sklearn model once, in an environment where unpickling that file is acceptable:

    import pickle, numpy as np
    with open("coco2017_gmm_k20", "rb") as f:
        gmm = pickle.load(f)  # sklearn.mixture.GaussianMixture, covariance_type='full'
    np.savez("coco2017_gmm_k20.npz", weights=gmm.weights_, means=gmm.means_,
             covariances=gmm.covariances_, precisions_cholesky=gmm.precisions_cholesky_)

`precisions_cholesky` is what sklearn's `score_samples` actually uses; when the file has only
`covariances`, it is recomputed the way sklearn does (Cholesky of each covariance, inverted).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from pbe_jax.evals.extract import iterate_features
from pbe_jax.outputs import atomic_write

QS_LOW, QS_HIGH = 0.0, 300.0  # the official normalisation (min_number, max_number)


@dataclass(frozen=True)
class GaussianMixture:
    """A full-covariance Gaussian mixture as sklearn stores it: `weights` `[K]`, `means`
    `[K, D]`, `precisions_cholesky` `[K, D, D]` (upper factor U with inv(S_k) = U U^T)."""

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray

    def __post_init__(self):
        k, d = self.means.shape
        if self.weights.shape != (k,) or self.precisions_cholesky.shape != (k, d, d):
            raise ValueError(
                f"GaussianMixture: weights {self.weights.shape}, means {self.means.shape}, precisions_cholesky "
                f"{self.precisions_cholesky.shape} are not [K], [K, D], [K, D, D]")
        if np.any(self.weights <= 0):
            raise ValueError(f"GaussianMixture: weights must be positive, got {self.weights}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def from_covariances(cls, weights, means, covariances) -> "GaussianMixture":
        """Like sklearn's `_compute_precision_cholesky` for `covariance_type='full'`."""
        covariances = np.asarray(covariances, np.float64)
        d = covariances.shape[-1]
        prec = np.empty_like(covariances)
        for k, cov in enumerate(covariances):
            try:
                chol = scipy.linalg.cholesky(cov, lower=True)
            except np.linalg.LinAlgError as e:
                raise ValueError(f"GaussianMixture: covariance of component {k} is not positive definite") from e
            prec[k] = scipy.linalg.solve_triangular(chol, np.eye(d), lower=True).T
        return cls(np.asarray(weights, np.float64), np.asarray(means, np.float64), prec)

    @classmethod
    def load(cls, path: str) -> "GaussianMixture":
        """Read an `.npz` with `weights`, `means` and `precisions_cholesky` and/or `covariances`."""
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = {"weights", "means"} - keys
            if missing or not keys & {"precisions_cholesky", "covariances"}:
                raise KeyError(f"{path}: a GMM file needs 'weights', 'means' and 'precisions_cholesky' or "
                               f"'covariances' (found {sorted(keys)}); see pbe_jax.evals.qs for the conversion")
            weights, means = np.asarray(f["weights"], np.float64), np.asarray(f["means"], np.float64)
            if "precisions_cholesky" in keys:
                return cls(weights, means, np.asarray(f["precisions_cholesky"], np.float64))
            return cls.from_covariances(weights, means, f["covariances"])

    def save(self, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, weights=self.weights, means=self.means, precisions_cholesky=self.precisions_cholesky)
        atomic_write(path, buf.getvalue())

    def log_constants(self) -> np.ndarray:
        """Per component: log w_k + log det U_k - D/2 log(2 pi) (float64) `[K]`."""
        log_det = np.log(np.diagonal(self.precisions_cholesky, axis1=1, axis2=2)).sum(axis=1)
        return np.log(self.weights) + log_det - 0.5 * self.dim * np.log(2 * np.pi)

    def score_samples(self, features: np.ndarray, *, chunk: int = 256) -> np.ndarray:
        """Per-sample log-likelihood `[N]` of `features` `[N, D]` (sklearn's `score_samples`).

        Jit-compiled, in float32 on the default device, with the data-independent constants
        in float64 on the host and the features centred on each mean before the product (the
        form that keeps float32 error at the ~1e-6 relative level).
        """
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"features {x.shape} do not match the GMM's dimension {self.dim} (the paper's "
                "coco2017_gmm_k20 is fit on 512-d CLIP ViT-B/32 image embeddings)")
        consts = jnp.asarray(self.log_constants(), jnp.float32)
        means = jnp.asarray(self.means, jnp.float32)
        prec = jnp.asarray(self.precisions_cholesky, jnp.float32)
        out = []
        for start in range(0, x.shape[0], chunk):
            part = x[start:start + chunk]
            n = part.shape[0]
            if n < chunk and x.shape[0] > chunk:  # keep one compiled shape for the tail
                part = np.concatenate([part, np.zeros((chunk - n, self.dim), np.float32)])
            out.append(np.asarray(_log_likelihood(jnp.asarray(part), means, prec, consts))[:n])
        return np.concatenate(out).astype(np.float64)


@jax.jit
def _log_likelihood(x: jax.Array, means: jax.Array, prec_chol: jax.Array, consts: jax.Array) -> jax.Array:
    """log sum_k exp(consts_k - |(x - mu_k) U_k|^2 / 2): `[N, D]` -> `[N]`."""
    diff = x[:, None, :] - means[None]  # [N, K, D]
    y = jnp.einsum("nkd,kde->nke", diff, prec_chol, precision=jax.lax.Precision.HIGHEST)
    return jax.nn.logsumexp(consts - 0.5 * jnp.sum(y * y, axis=-1), axis=-1)


def quality_score(log_likelihoods: np.ndarray, *, low: float = QS_LOW, high: float = QS_HIGH) -> float:
    """The official QS from per-image log-likelihoods: mean(clip((ll - low) / (high - low), 0, 1)) x 100."""
    ll = np.asarray(log_likelihoods, np.float64)
    if ll.size == 0:
        raise ValueError("quality_score: no log-likelihoods")
    return float(np.clip((ll - low) / (high - low), 0.0, 1.0).mean() * 100.0)


def compute_qs(
    images: Iterable[np.ndarray],
    extract: Callable[[np.ndarray], np.ndarray],
    gmm: GaussianMixture,
    *,
    total: int | None = None,
    progress: bool = True,
) -> tuple[float, np.ndarray]:
    """QS over an iterable of preprocessed image batches -> (QS, per-image log-likelihoods `[N]`)."""
    features = iterate_features(extract, images, total=total, desc="QS", progress=progress)
    lls = [gmm.score_samples(f) for f in features]
    if not lls:
        raise ValueError("compute_qs: no images")
    ll = np.concatenate(lls)
    return quality_score(ll), ll
