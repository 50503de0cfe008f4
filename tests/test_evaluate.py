"""COCOEE evaluate CLI end to end (sample + score, resume, results-only mode with other tools'
file names) and the training eval hook, on a tiny random PbE pipeline, a tiny random CLIP and a
4-triplet bench in the COCOEE layout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pbe_jax.evals.qs import GaussianMixture
from pbe_jax.evaluation import cocoee
from tests.helpers import save_tiny_clip
from tests.test_weights_diffusers import tiny_pipeline
from tests.train_utils import subprocess_env

H = W = 32  # the tiny model's VAE x UNet factor is 4
IDS = [1773, 3419, 3658, 4594]
BOXES = [(8, 24, 4, 20), (4, 28, 8, 28), (12, 20, 12, 24), (0, 16, 16, 32)]  # top, bottom, left, right
PROJ = 16  # the metric CLIP's embedding size


def _smooth(rng, h, w, i):
    yy, xx = np.mgrid[:h, :w]
    s = np.stack([np.sin(yy / (3.0 + i)), np.cos(xx / 4.0), np.sin((xx - yy) / 5.0)], -1)
    return np.clip(128 + 90 * s + rng.normal(0, 25, s.shape), 0, 255).astype(np.uint8)


def _make_bench(root, rng):
    for d in (cocoee.GT_DIR, cocoee.REF_DIR, cocoee.MASK_DIR):
        os.makedirs(os.path.join(root, d))
    np.save(os.path.join(root, "id_list.npy"), np.asarray(IDS))
    for i, (cid, (t, b, l, r)) in enumerate(zip(IDS, BOXES)):
        rid = str(cid).zfill(12)
        Image.fromarray(_smooth(rng, H, W, i)).save(os.path.join(root, cocoee.GT_DIR, f"{rid}_GT.png"))
        Image.fromarray(rng.integers(0, 256, (20 + 4 * i, 24, 3), np.uint8)).save(
            os.path.join(root, cocoee.REF_DIR, f"{rid}_ref.png"))
        mask = np.zeros((H, W), np.uint8)
        mask[t:b, l:r] = 255
        Image.fromarray(mask).save(os.path.join(root, cocoee.MASK_DIR, f"{rid}_mask.png"))


def _metric_clip(path):
    save_tiny_clip(path, image_size=32, patch_size=8, projection_dim=PROJ)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    d = {k: str(tmp / k) for k in ("model", "clip", "bench", "fid_ref", "out")}
    d["gmm"] = str(tmp / "gmm.npz")
    tiny_pipeline(seed=5).save_pretrained(d["model"])
    _metric_clip(d["clip"])
    _make_bench(d["bench"], rng)
    os.makedirs(d["fid_ref"])
    for i in range(6):  # raw "COCO test2017" images of various sizes
        Image.fromarray(_smooth(rng, 40 + 8 * i, 56, i + 3)).save(os.path.join(d["fid_ref"], f"{i:012d}.jpg"))
    GaussianMixture.from_covariances(np.array([0.3, 0.7]), rng.normal(size=(2, PROJ)),
                                     np.stack([np.eye(PROJ) * 4.0] * 2)).save(d["gmm"])
    d["metric_flags"] = [f"--clip_model={d['clip']}", f"--fid_ref={d['fid_ref']}", "--fid_features=clip",
                         f"--gmm={d['gmm']}", "--batch_size=4"]
    d["cmd"] = [sys.executable, "-m", "pbe_jax.evaluate", f"--bench={d['bench']}", f"--model={d['model']}",
                f"--out={d['out']}", "--steps=2", "--guidance=5", *d["metric_flags"]]
    d["env"] = subprocess_env(2)
    d["run1"] = subprocess.run(d["cmd"], capture_output=True, text=True, env=d["env"], timeout=600)
    return d


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_cli_samples_and_scores(env):
    p = env["run1"]
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "4 images written" in p.stdout
    rep = _metrics(env["out"])
    assert set(rep["metrics"]) == {"fid", "qs", "clip_score"} and rep["skipped"] == {}
    assert all(np.isfinite(v) for v in rep["metrics"].values()), rep["metrics"]
    assert 0.0 <= rep["metrics"]["qs"] <= 100.0 and rep["metrics"]["fid"] > 0
    assert rep["num_images"] == rep["num_bench"] == 4 and rep["missing"] == []
    assert rep["protocol"]["fid"]["features"] == "clip"
    per = rep["per_image"]["clip_score"]
    assert sorted(per) == [str(i).zfill(12) for i in IDS]
    assert np.std(list(per.values())) > 0.1  # the random CLIP tells images apart
    files = sorted(os.listdir(os.path.join(env["out"], "results")))
    assert files == sorted(f"{i:012d}_0.png" for i in IDS) + ["settings.json"]
    md = open(os.path.join(env["out"], "metrics.md")).read()
    assert "| results | images | FID (clip) | QS | CLIP score |" in md
    assert f"{rep['metrics']['clip_score']:.4f}" in md
    assert any(f.startswith("fid_ref_clip_") and f.endswith(".npz") for f in os.listdir(env["out"]))


def test_cli_rerun_resumes_and_results_mode_matches(env, tmp_path):
    first = _metrics(env["out"])
    res = os.path.join(env["out"], "results")
    mtimes = {f: os.path.getmtime(os.path.join(res, f)) for f in os.listdir(res) if f.endswith(".png")}
    p = subprocess.run(env["cmd"], capture_output=True, text=True, env=env["env"], timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "0 images written, 4 already there" in p.stdout
    assert {f: os.path.getmtime(os.path.join(res, f)) for f in os.listdir(res) if f.endswith(".png")} == mtimes
    np.testing.assert_allclose(_metrics(env["out"])["metrics"]["clip_score"], first["metrics"]["clip_score"],
                               rtol=1e-9)

    # Results from "another tool": the official `<id>.png` names, here without zero padding.
    other = tmp_path / "official"
    other.mkdir()
    for i in IDS:
        shutil.copy(os.path.join(res, f"{i:012d}_0.png"), other / f"{i}.png")
    out2 = tmp_path / "scored"
    cmd = [sys.executable, "-m", "pbe_jax.evaluate", f"--results={other}", f"--bench={env['bench']}",
           f"--out={out2}", *env["metric_flags"]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env["env"], timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    rep = _metrics(str(out2))
    for k in ("clip_score", "fid", "qs"):
        np.testing.assert_allclose(rep["metrics"][k], first["metrics"][k], rtol=1e-6, err_msg=k)
    assert rep["per_image"]["clip_score"] == pytest.approx(first["per_image"]["clip_score"], rel=1e-6)


def test_training_hook_returns_configured_metrics(env):
    from pbe_jax.evaluation.benchmark import training_eval
    from pbe_jax.evals.config import evals_config
    from pbe_jax.pipeline import PaintByExample

    config = ml_collections.ConfigDict({"evals": evals_config()})
    assert training_eval(None, config, 100) == {}  # off by default
    config.evals.update(every_steps=5, bench=env["bench"], limit=3, steps=2, guidance=5.0, batch_size=4,
                        clip_model=env["clip"], fid_ref=env["fid_ref"], fid_features="clip")
    model = PaintByExample.from_pretrained(env["model"])
    assert training_eval(model, config, 7) == {}  # not an eval step
    got = training_eval(model, config, 10)
    assert set(got) == {"eval/clip_score", "eval/fid"}  # no GMM configured: no QS
    assert all(np.isfinite(v) for v in got.values())
    # Same seeds and quantisation as the CLI: the first 3 images score as the CLI's did (up to
    # float differences between a 2-device mesh and one device).
    per = _metrics(env["out"])["per_image"]["clip_score"]
    cli = np.mean([per[f"{i:012d}"] for i in IDS[:3]])
    np.testing.assert_allclose(got["eval/clip_score"], cli, atol=0.05)


def test_training_eval_samples_with_the_models_own_scheduler(monkeypatch):
    """`config.evals.scheduler` '' (the default) samples with the model's own scheduler (the
    demo's x0 model is DDIM-only); a name picks that one."""
    from pbe_jax.evaluation import benchmark
    from pbe_jax.evals.config import evals_config

    class Sampled(Exception):
        pass

    seen = []

    def generate(model, rows, **kw):
        seen.append(kw["scheduler"])
        raise Sampled

    monkeypatch.setattr(benchmark.cocoee, "read_bench", lambda *a, **kw: [])
    monkeypatch.setattr(benchmark, "generate", generate)
    config = ml_collections.ConfigDict({"evals": evals_config()})
    config.evals.update(every_steps=1, bench="bench")
    for name in ("", "ddim"):
        config.evals.scheduler = name
        with pytest.raises(Sampled):
            benchmark.training_eval(None, config, 1)
    assert seen == [None, "ddim"]


def test_result_names_and_errors(tmp_path):
    ids = ["000000001773", "000000003419", "abc_7"]
    for name in ("1773.png", "000000003419_GT.png", "abc_7_0.png", "abc_7_1.png", "notes.txt", "9_0.png"):
        (tmp_path / name).write_bytes(b"")
    found = cocoee.match_results(str(tmp_path), ids)
    assert {k: os.path.basename(v) for k, v in found.items()} == {
        "000000001773": "1773.png", "000000003419": "000000003419_GT.png", "abc_7": "abc_7_0.png"}
    assert os.path.basename(cocoee.match_results(str(tmp_path), ids, sample_index=1)["abc_7"]) == "abc_7_1.png"
    (tmp_path / "000000001773.png").write_bytes(b"")
    with pytest.raises(ValueError, match="two results for id 000000001773"):
        cocoee.match_results(str(tmp_path), ids)
    with pytest.raises(FileNotFoundError, match="not a COCOEE test bench"):
        cocoee.read_bench(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        cocoee.read_bench(str(tmp_path / "nope"))


def test_fid_reference_preparation_is_idempotent(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), np.uint8)).save(tmp_path / "a.jpg")
    first = cocoee.fid_reference_image(str(tmp_path / "a.jpg"))
    assert first.size == (512, 512)
    assert cocoee.prepare_fid_reference(str(tmp_path), str(tmp_path / "prep")) == 1
    again = cocoee.fid_reference_image(str(tmp_path / "prep" / "a.png"))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    # torchvision Resize(512) + CenterCrop(512): short side 600 -> 512, long 800 -> int(682.67) = 682
    ref = Image.open(tmp_path / "a.jpg").convert("RGB").resize((682, 512), Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(ref)[:, 85:597])
