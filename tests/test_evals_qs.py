"""QS: GMM log-likelihoods against scipy's multivariate normal mixture and sklearn's
`GaussianMixture.score_samples` (converted to `.npz` as documented), the official
normalisation, and the CLIP preprocessing of the official FID/QS scripts."""
import numpy as np
import pytest
import scipy.special
import scipy.stats
from PIL import Image

from pbe_jax.evals.images import clip_pil_resize_crop
from pbe_jax.evals.qs import GaussianMixture, compute_qs, quality_score
from pbe_jax.models.clip import clip_preprocess


def _random_gmm(rng, k, d):
    weights = rng.random(k) + 0.2
    weights /= weights.sum()
    means = rng.normal(size=(k, d))
    a = rng.normal(size=(k, d, d)) * 0.3
    covariances = a @ np.swapaxes(a, 1, 2) + 0.2 * np.eye(d)
    return weights, means, covariances


def _scipy_log_likelihood(x, weights, means, covariances):
    logpdf = np.stack([scipy.stats.multivariate_normal(m, c).logpdf(x) for m, c in zip(means, covariances)], -1)
    return scipy.special.logsumexp(logpdf + np.log(weights), axis=-1)


def test_score_samples_matches_scipy_mixture(tmp_path):
    rng = np.random.default_rng(0)
    weights, means, covariances = _random_gmm(rng, 3, 6)
    x = means[rng.integers(0, 3, 37)] + rng.normal(size=(37, 6)) * 0.8
    ref = _scipy_log_likelihood(x, weights, means, covariances)
    path = str(tmp_path / "gmm.npz")
    np.savez(path, weights=weights, means=means, covariances=covariances)  # no precisions: recomputed
    gmm = GaussianMixture.load(path)
    np.testing.assert_allclose(gmm.score_samples(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gmm.score_samples(x, chunk=16), ref, rtol=1e-5, atol=1e-5)  # padded tail


def test_sklearn_gmm_converted_as_documented_gives_its_scores_and_qs(tmp_path):
    mixture = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(1)
    d = 64
    # Tight clusters so that log-likelihoods fall below 0, inside (0, 300) and above 300: all
    # three branches of the official clipping.
    centres = rng.normal(size=(4, d))
    train = centres[rng.integers(0, 4, 800)] + rng.normal(size=(800, d)) * 0.002
    sk = mixture.GaussianMixture(n_components=4, covariance_type="full", random_state=0).fit(train)
    path = str(tmp_path / "coco2017_gmm_k20.npz")
    np.savez(path, weights=sk.weights_, means=sk.means_, covariances=sk.covariances_,
             precisions_cholesky=sk.precisions_cholesky_)
    gmm = GaussianMixture.load(path)
    noise = np.concatenate([rng.uniform(0.0015, 0.004, (56, 1)), np.full((8, 1), 0.02)])
    test = centres[rng.integers(0, 4, 64)] + rng.normal(size=(64, d)) * noise
    ref = sk.score_samples(test)
    assert (ref < 0).sum() >= 4 and (ref > 300).sum() >= 4 and ((ref > 0) & (ref < 300)).sum() >= 10
    ours = gmm.score_samples(test)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)
    # The official formula: (score - 0) / (300 - 0), clipped to [0, 1], averaged, x 100.
    official = float(np.mean(np.clip((ref - 0.0) / (300.0 - 0.0), 0, 1)) * 100)
    np.testing.assert_allclose(quality_score(ours), official, rtol=1e-6)
    # Through the batch loop, with the features as their own "extractor".
    qs, ll = compute_qs([test[:30], test[30:]], lambda f: f, gmm, progress=False)
    np.testing.assert_allclose(ll, ours, rtol=1e-6)  # other batch shapes: float32 rounding
    np.testing.assert_allclose(qs, quality_score(ours), rtol=1e-12)


def test_dimension_mismatch_and_bad_file_name_the_problem(tmp_path):
    weights, means, covariances = _random_gmm(np.random.default_rng(2), 2, 4)
    gmm = GaussianMixture.from_covariances(weights, means, covariances)
    with pytest.raises(ValueError, match=r"\(5, 3\).*dimension 4"):
        gmm.score_samples(np.zeros((5, 3)))
    path = str(tmp_path / "broken.npz")
    np.savez(path, weights=weights, covariances=covariances)
    with pytest.raises(KeyError, match="broken.npz.*means"):
        GaussianMixture.load(path)


@pytest.mark.parametrize("hw", [(300, 200), (181, 257), (224, 250)])
def test_clip_file_preprocessing_matches_transformers_pil_processor(hw):
    """OpenAI CLIP `preprocess` = short side to 224 (PIL bicubic), centre crop, normalise; the
    transformers PIL processor does the same (sizes chosen so both crop offsets round alike)."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil() if hasattr(transformers, "CLIPImageProcessorPil") \
        else transformers.CLIPImageProcessor()
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    smooth = np.stack([np.sin(yy / 9.0), np.cos(xx / 13.0), np.sin((xx + yy) / 17.0)], -1)
    img = Image.fromarray(np.clip(128 + 100 * smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8))
    ref = processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    crop = clip_pil_resize_crop(img)
    assert crop.dtype == np.uint8 and crop.shape == (224, 224, 3)
    ours = np.asarray(clip_preprocess(crop[None]))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
