"""Inference: PaintByExample.__call__ vs diffusers' PaintByExamplePipeline, sizes, paste-back,
determinism, and the batch CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

from pbe_jax.pipeline import PaintByExample
from tests.test_weights_diffusers import IMAGE, tiny_pipeline
from tests.train_utils import subprocess_env

H = W = 32  # pixels; the tiny model's VAE x UNet factor is 4


def _images(seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    src = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[8:24, 4:20] = 255  # white = edit, aligned to the latent grid
    ref = Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), np.uint8))
    return src, Image.fromarray(m), ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch_pipe = tiny_pipeline(seed=3)
    d = str(tmp_path_factory.mktemp("pbe"))
    torch_pipe.save_pretrained(d)
    return torch_pipe, PaintByExample.from_pretrained(d), d


def _diffusers(torch_pipe, scheduler, latents, guidance, steps, monkeypatch):
    from diffusers.models.autoencoders import vae as dvae

    # masked_latents='mode' on both sides (diffusers samples the posterior)
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    torch_pipe.scheduler = scheduler
    src, mask, ref = _images()
    out = torch_pipe(example_image=ref, image=src, mask_image=mask, height=H, width=W,
                     num_inference_steps=steps, guidance_scale=guidance,
                     latents=torch.from_numpy(latents).permute(0, 3, 1, 2), output_type="np")
    return out.images


@pytest.mark.parametrize("name,guidance", [("plms", 5.0), ("ddim", 5.0), ("plms", 1.0)])
def test_pipeline_equals_diffusers(models, name, guidance, monkeypatch):
    torch_pipe, ours, _ = models
    latents = np.random.default_rng(1).standard_normal((1, H // 2, W // 2, 4)).astype(np.float32)
    sched = PNDMScheduler.from_config(torch_pipe.scheduler.config)  # the repo's PLMS
    if name == "ddim":
        # as ours (and the official LDM DDIM sampler): no x0 clipping
        sched = DDIMScheduler.from_config(torch_pipe.scheduler.config, clip_sample=False)
    ref = _diffusers(torch_pipe, sched, latents, guidance, 10, monkeypatch)
    src, mask, r = _images()
    got = ours(src, mask, r, num_inference_steps=10, guidance_scale=guidance, scheduler=name,
               latents=latents, masked_latents="mode", reference_preprocess="center_crop",
               output_type="np")
    assert got.shape == ref.shape == (1, H, W, 3)
    err = np.abs(got - ref).max()
    assert err <= 2e-3, err
    assert np.abs(ref - 0.5).max() > 0.05  # not a trivial output


@pytest.mark.slow
def test_determinism_and_seeds(models):
    _, ours, _ = models
    src, mask, ref = _images()
    kw = dict(num_inference_steps=4, output_type="np")
    a = ours(src, mask, ref, seed=7, **kw)
    b = ours(src, mask, ref, seed=7, **kw)
    c = ours(src, mask, ref, seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # an image's result does not depend on its batch-mates (per-image seeds)
    two = ours([src, src], [mask, mask], [ref, ref], seed=[7, 99], **kw)
    np.testing.assert_allclose(two[0], a[0], atol=1e-5)
    k = ours(src, mask, ref, seed=7, num_images_per_prompt=2, **kw)
    assert k.shape == (2, H, W, 3)


def test_any_size_and_paste_back_keeps_unmasked_pixels(models):
    _, ours, _ = models
    src, mask, ref = _images(seed=2, h=30, w=26)  # not multiples of the factor 4
    out = ours(src, mask, ref, num_inference_steps=3, paste_back=True)
    assert len(out) == 1 and out[0].size == (26, 30)
    got, orig = np.asarray(out[0]), np.asarray(src)
    edit = np.asarray(mask) > 127
    np.testing.assert_array_equal(got[~edit], orig[~edit])  # exactly the source outside
    assert np.abs(got[edit].astype(int) - orig[edit]).mean() > 5  # edited inside
    plain = ours(src, mask, ref, num_inference_steps=3, output_type="np")
    assert plain.shape == (1, 30, 26, 3)
    assert np.abs(plain[0][~edit] - orig[~edit] / 255).max() > 0  # without paste-back: re-synthesised


def test_bad_inputs_name_the_problem(models):
    _, ours, _ = models
    src, mask, ref = _images()
    with pytest.raises(ValueError, match="no white"):
        ours(src, Image.new("L", (W, H)), ref, num_inference_steps=2)
    with pytest.raises(ValueError, match="mask 0 is"):
        ours(src, Image.new("L", (W + 4, H), 255), ref, num_inference_steps=2)


@pytest.mark.slow
def test_cli_manifest_with_a_bad_row(models, tmp_path):
    _, _, model_dir = models
    src, mask, ref = _images()
    for name, img in (("s.png", src), ("m.png", mask), ("r.png", ref)):
        img.save(tmp_path / name)
    Image.new("L", (W, H)).save(tmp_path / "empty.png")
    rows = [{"id": "a", "source": "s.png", "mask": "m.png", "reference": "r.png", "seed": 3},
            {"id": "bad", "source": "missing.png", "mask": "m.png", "reference": "r.png"},
            {"id": "empty", "source": "s.png", "mask": "empty.png", "reference": "r.png"},
            {"id": "b", "source": "s.png", "mask": "m.png", "reference": "r.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pbe_jax.sample", f"--model={model_dir}", f"--manifest={manifest}",
           f"--out={out}", "--steps=3", "--batch_size=4", "--num_samples=2"]
    env = subprocess_env(1)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert "2/4 rows done, 2 failed" in p.stdout
    assert "missing source file" in p.stdout and "empty mask" in p.stdout
    files = sorted(os.listdir(out))
    assert files == ["a_0.png", "a_1.png", "b_0.png", "b_1.png", "settings.json"]
    assert json.loads((out / "settings.json").read_text())["steps"] == 3
    mtime = os.path.getmtime(out / "a_0.png")
    p2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p2.returncode == 1 and os.path.getmtime(out / "a_0.png") == mtime  # resumed, not redone
