"""Frechet distance against a float64 scipy `sqrtm` reference, streaming statistics, `.npz`
caches, and the jitted, mesh-sharded feature extraction loop."""
import jax
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from jax.sharding import Mesh

from pbe_jax.evals.extract import FeatureExtractor
from pbe_jax.evals.fid import (
    FeatureStats,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
    statistics_from_features,
)


def _features(rng, n, d, shift=0.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift + rng.normal(size=d)


def _scipy_fid(f1, f2):
    """The textbook formula, in float64, with scipy's `sqrtm` of the (non-symmetric) product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-6
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_fid_matches_scipy_sqrtm_reference(method):
    rng = np.random.default_rng(0)
    f1, f2 = _features(rng, 400, 48), _features(rng, 300, 48, shift=0.3)
    ref = _scipy_fid(f1, f2)
    ours = fid_from_features(f1, f2, method=method)
    assert ref > 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_fid_with_singular_covariances_is_finite_and_matches_reference():
    """Fewer samples than dimensions (as with a small eval set and 2048-d features): S1 S2 is
    singular; the eigendecomposition route still gives the reference value."""
    rng = np.random.default_rng(1)
    f1, f2 = _features(rng, 30, 64), _features(rng, 40, 64, shift=0.1)
    ours = fid_from_features(f1, f2)
    # Reference through the symmetric form, computed independently with scipy's sqrtm.
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = np.real(scipy.linalg.sqrtm(s1))
    tr = np.trace(np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1)))
    ref = np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    f = _features(np.random.default_rng(2), 500, 64)
    mu, sigma = statistics_from_features(f)
    assert abs(fid_from_features(f, f)) < 1e-6 * np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method="sqrtm")) < 1e-6 * np.trace(sigma)


def test_streaming_statistics_equal_numpy_on_offset_features():
    rng = np.random.default_rng(3)
    f = _features(rng, 257, 16) * 1e-2 + 1e4  # a large mean against a small spread
    stats = FeatureStats()
    for part in np.split(f, [1, 50, 51, 200]):
        stats.update(part)
    exact = f.astype(np.longdouble)
    centred = exact - exact.mean(0)
    cov_exact = (centred.T @ centred / (len(f) - 1)).astype(np.float64)
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-14)
    # float64 inputs near 1e4 carry ~1e-10 relative digits of their deviations; the naive
    # sum(x x^T) - n mu mu^T is off by ~3e-7 here (over 1e6 x the tolerance).
    tol = 1e-9 * np.abs(cov_exact).max()
    np.testing.assert_allclose(stats.sigma, cov_exact, rtol=0, atol=tol)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=0, atol=tol)


def test_npz_round_trip_in_pytorch_fid_format(tmp_path):
    mu, sigma = statistics_from_features(_features(np.random.default_rng(4), 50, 8))
    path = str(tmp_path / "stats.npz")
    save_statistics(path, mu, sigma)
    with np.load(path) as f:  # what pytorch-fid's `compute_statistics_of_path` reads
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=mu)
    with pytest.raises(KeyError, match="bad.npz.*'mu', 'sigma'"):
        load_statistics(bad)


class _Projection(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
        return jax.nn.tanh(self.proj(x.reshape(x.shape[0], -1)))


def test_compute_statistics_sharded_extraction_and_cache(tmp_path):
    """8-device mesh, batches of 5 (padded to 8) with a short last batch: equals the statistics
    of the plain forward; the second call reads the cache instead of extracting."""
    model = _Projection(nnx.Rngs(0))
    images = np.random.default_rng(5).random((23, 2, 2, 3), dtype=np.float32)
    direct = np.asarray(model(images))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    extractor = FeatureExtractor(model, lambda m, x: m(x), mesh=mesh, batch_size=5)
    calls = []

    def extract(batch):
        calls.append(len(batch))
        return extractor(batch)

    batches = [images[i:i + 5] for i in range(0, 23, 5)]
    cache = str(tmp_path / "cache" / "ref.npz")
    mu, sigma = compute_statistics(batches, extract, cache=cache, progress=False)
    assert calls == [5, 5, 5, 5, 3]
    mu_ref, sigma_ref = statistics_from_features(direct)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6)
    mu2, sigma2 = compute_statistics(batches, extract, cache=cache, progress=False)
    assert len(calls) == 5
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
