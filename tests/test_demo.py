"""The demo's task: the exemplar-following score, the VAE stage, and a short run of the demo
that must learn to paint the reference into the mask."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.configs import load_config
from pbe_jax.data.synthetic import PALETTE, draw_scene
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.evals.reconstruction import psnr, reconstruct
from pbe_jax.evaluation import exemplar as ex
from pbe_jax.models.paint_by_example import FROZEN, TRAINABLE, is_frozen, param_filters
from pbe_jax.training import vae_fit
from pbe_jax.training.state import Setup
from pbe_jax.training.vae_fit import heldout_data_config, load_vae
from tests.train_utils import CONFIG_FILE, REPO, read_metrics, subprocess_env


@pytest.fixture(scope="module")
def demo():
    return load_config(f"{CONFIG_FILE}:demo")


@pytest.fixture(scope="module")
def triplets(demo):
    return ex.heldout_triplets(demo.data, 64, seed=1000)


def _paint(triplets, colours):
    """The sources with the hole grey and the scored region filled with `colours` [N]."""
    out = triplets.source.copy()
    out[triplets.edit] = 128
    for i, c in enumerate(colours):
        if c >= 0:
            out[i][triplets.region[i]] = PALETTE[c].astype(np.uint8)
    return out


def test_triplets_are_held_out_self_and_cross_references(demo, triplets):
    n = len(triplets) // 2
    r, rr = demo.data.resolution, demo.data.reference_size
    assert triplets.source.shape == (2 * n, r, r, 3) and triplets.reference.shape == (2 * n, rr, rr, 3)
    assert not triplets.cross[:n].any() and triplets.cross[n:].all()
    np.testing.assert_array_equal(triplets.source[:n], triplets.source[n:])  # same edits, two refs
    assert (triplets.ref_colour[:n] == triplets.src_colour[:n]).all()  # self: the object itself
    assert (triplets.ref_colour[n:] != triplets.src_colour[n:]).all()  # cross: another colour
    assert len(set(triplets.ref_colour[n:].tolist())) >= 6  # every colour shows up
    # the scored region lies in the hole and is not empty; the keep pixels are outside it
    assert (triplets.region.sum(axis=(1, 2)) > 0).all()
    assert not (triplets.region & ~triplets.edit).any() and not (triplets.keep & triplets.edit).any()
    # held out: the eval scenes (seed 1000) are not the training scenes (seed 0)
    train = draw_scene(0, seed=int(demo.data.synthetic_seed), style="palette",
                       min_side=demo.data.synthetic_min_side, max_side=demo.data.synthetic_max_side)
    held = draw_scene(0, seed=1000, style="palette", min_side=demo.data.synthetic_min_side,
                      max_side=demo.data.synthetic_max_side)
    assert train.image.shape != held.image.shape or not np.array_equal(train.image, held.image)


def test_score_of_perfect_copying_random_and_empty_edits(triplets):
    n = len(triplets) // 2
    perfect = ex.score_edits(_paint(triplets, triplets.ref_colour), triplets)
    assert perfect["exemplar_following"] == 1.0 and perfect["self_following"] == 1.0
    assert perfect["exemplar_closer"] == 1.0
    copy = ex.score_edits(triplets.source, triplets)  # the masked object put back
    assert copy["exemplar_following"] == 0.0 and copy["self_following"] == 1.0
    assert copy["exemplar_closer"] == 0.0
    assert copy["psnr_outside_mask"] == 100.0
    empty = ex.score_edits(_paint(triplets, np.full(2 * n, -1)), triplets)  # nothing painted
    assert empty["exemplar_following"] == 0.0 and empty["self_following"] == 0.0
    rng = np.random.default_rng(0)
    chance = [ex.score_edits(_paint(triplets, rng.integers(0, len(PALETTE), 2 * n)),
                             triplets)["exemplar_following"] for _ in range(8)]
    assert abs(np.mean(chance) - ex.CHANCE) < 0.04, chance  # 512 draws: std 0.015
    closer = [ex.score_edits(_paint(triplets, rng.integers(0, len(PALETTE), 2 * n)),
                             triplets)["exemplar_closer"] for _ in range(8)]
    assert 0.35 < np.mean(closer) < 0.65, closer  # about 1/2
    # float images in [0, 1] score as their uint8 versions
    as_float = ex.score_edits(_paint(triplets, triplets.ref_colour) / 255.0, triplets)
    assert as_float["exemplar_following"] == 1.0


def test_psnr_outside_the_mask_sees_only_kept_pixels(triplets):
    noisy = triplets.source.astype(np.float32) / 255.0
    noisy[triplets.edit] = 0.0  # anything inside the hole does not count
    assert np.all(psnr(noisy, triplets.source, where=triplets.keep) == 100.0)
    noisy[triplets.keep] += 0.1
    np.testing.assert_allclose(psnr(np.clip(noisy, 0, 1), triplets.source, where=triplets.keep),
                               20.0, atol=0.3)


def test_exemplar_grid_layout(triplets):
    grid = ex.exemplar_grid(triplets, triplets.source / 255.0, rows=3)
    t = max(ex.MIN_TILE, triplets.source.shape[1])
    assert grid.shape == (6 * t, 4 * t, 3)
    assert grid[:t, t:2 * t].max() == 1.0 and grid[:t, t:2 * t].min() == 0.0  # the mask tile


def test_heldout_data_overrides(demo):
    held = heldout_data_config(demo.data, "synthetic_seed=7, synthetic_num_images=12,decode_reduced=false")
    assert (held.synthetic_seed, held.synthetic_num_images, held.decode_reduced) == (7, 12, False)
    assert demo.data.synthetic_seed == 0  # a copy
    with pytest.raises(ValueError, match="heldout_data.*synthetic_sed"):
        heldout_data_config(demo.data, "synthetic_sed=7")


class _Ckpt:
    """What `run_vae_stage` asks of a Checkpointer."""

    def __init__(self, directory, steps):
        self.directory, self._steps = str(directory), list(steps)

    def steps(self):
        return self._steps


def test_vae_stage_reuses_workdir_vae_and_a_resume_keeps_the_scaling(tmp_path, monkeypatch):
    cfg = load_config(f"{CONFIG_FILE}:demo")
    mesh = shd.make_mesh("data:-1")
    vae, _ = vae_fit.random_vae(cfg, mesh)
    vae.config = dataclasses.replace(vae.config, scaling_factor=0.5)
    vae_fit.save_vae(vae_fit.FittedVAE(vae=vae, psnr=0.0, info={}), str(tmp_path / "vae"))
    monkeypatch.setattr(vae_fit, "fit_vae", lambda *a, **k: pytest.fail("the VAE was fitted again"))
    got = vae_fit.run_vae_stage(cfg, str(tmp_path), mesh, _Ckpt(tmp_path / "checkpoints", []))
    assert got == str(tmp_path / "vae") and cfg.model.vae.scaling_factor == 0.5
    setup = Setup(cfg, mesh)
    frozen = vae_fit.frozen_with_vae(setup.random_params()[1], got, setup.place_fn())
    saved = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(frozen["vae"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # resumed (a checkpoint exists): the checkpoint holds the frozen VAE, nothing is loaded
    assert vae_fit.run_vae_stage(cfg, str(tmp_path), mesh, _Ckpt(tmp_path, [5])) is None
    # resumed without WORKDIR/vae: the scaling factor the run trained with, from its checkpoint
    monkeypatch.setattr(vae_fit.checkpoint, "read_config",
                        lambda d: {"model": {"vae": {"scaling_factor": 0.25}}})
    assert vae_fit.run_vae_stage(cfg, str(tmp_path / "other"), mesh, _Ckpt(tmp_path, [5])) is None
    assert cfg.model.vae.scaling_factor == 0.25
    # a saved VAE of another architecture is refused, naming the field
    cfg.model.vae.block_out_channels = (8, 32)
    with pytest.raises(ValueError, match="block_out_channels"):
        vae_fit.run_vae_stage(cfg, str(tmp_path), mesh, _Ckpt(tmp_path / "checkpoints", []))
    # off: nothing happens
    cfg.vae_fit.steps = 0
    assert vae_fit.run_vae_stage(cfg, str(tmp_path), mesh, _Ckpt(tmp_path, [])) is None


def test_demo_departures_stay_in_the_demo(demo):
    """The demo trains the CLIP tower and predicts x0; sd15 keeps the paper's split and eps."""
    sd15 = load_config(f"{CONFIG_FILE}:sd15")
    assert demo.train.train_image_tower and not sd15.train.train_image_tower
    assert sd15.vae_fit.steps == 0 and sd15.exemplar_eval.num_triplets == 0
    assert sd15.data.synthetic_style == "varied" and demo.data.synthetic_style == "palette"
    tower = ("image_encoder", "model", "encoder", "layers", "0")
    assert is_frozen(tower) and not is_frozen(tower, train_image_tower=True)
    assert is_frozen(("vae", "encoder")) and is_frozen(("vae", "encoder"), train_image_tower=True)
    assert param_filters(False) == (TRAINABLE, FROZEN)
    z0, noise = np.ones((2, 4, 4, 4), np.float32), np.zeros((2, 4, 4, 4), np.float32)
    x0_target = NoiseSchedule.from_config(demo.model.scheduler.to_dict()).target(z0, noise, np.array([5, 500]))
    np.testing.assert_array_equal(np.asarray(x0_target), z0)
    assert NoiseSchedule.from_config(sd15.model.scheduler.to_dict()).prediction_type == "epsilon"


def _run(args, timeout=900, optimized=False):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=subprocess_env(1, optimized),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fit_vae_cli_writes_a_diffusers_autoencoder(tmp_path):
    """`python -m pbe_jax.fit_vae`: a diffusers AutoencoderKL folder with the fitted scaling
    factor, which diffusers loads and runs to the same reconstruction as ours."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    r = _run(["pbe_jax.fit_vae", f"--config={CONFIG_FILE}:demo", f"--workdir={tmp_path}",
              "--config.vae_fit.steps=30", "--config.vae_fit.heldout_images=8", "--config.log_every_steps=10"],
             optimized=True)  # the short demo's VAE programs, which the test below then reads from the cache
    assert r.returncode == 0, r.stderr[-3000:]
    vae_dir = tmp_path / "vae"
    info = json.loads((vae_dir / "fit.json").read_text())
    cfg = json.loads((vae_dir / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] == info["scaling_factor"] != 1.0
    assert info["steps"] == 30 and info["final"]["recon"] < info["history"][0]["recon"]
    assert f"held-out PSNR {info['heldout_psnr']:.2f} dB" in r.stdout
    ours = load_vae(str(vae_dir))
    theirs = diffusers.AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    assert theirs.config.scaling_factor == ours.config.scaling_factor
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    with torch.no_grad():
        t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        ref = theirs.decode(theirs.encode(t).latent_dist.mode()).sample
    ref = np.clip(ref.permute(0, 2, 3, 1).numpy() / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(reconstruct(ours, x), ref, atol=2e-4)


# The shortened demo: the README command's path (VAE stage, then Paint-by-Example training with
# the held-out eval) with fewer VAE and training steps. Thresholds from measurement (see
# README "What the demo learns"): this length reached VAE_PSNR_SHORT + ~2 dB and a score of
# ~0.5-0.6 where chance is 1/8.
SHORT = {"vae_fit.steps": 120, "vae_fit.heldout_images": 32, "train.num_steps": 250,
         "exemplar_eval.num_triplets": 16, "sample_every_steps": 0, "ckpt_every_steps": 1000,
         "log_every_steps": 50, "data.num_workers": 0}
VAE_PSNR_SHORT = 19.0  # dB, the VAE stage's held-out PSNR after SHORT's steps
SCORE_SHORT = 0.35  # exemplar_following after SHORT's steps; P(>= this | chance) < 0.01


@pytest.mark.slow
def test_short_demo_run_learns_to_follow_the_exemplar(tmp_path):
    r = _run(["pbe_jax.train", f"--config={CONFIG_FILE}:demo", f"--workdir={tmp_path}",
              *[f"--config.{k}={v}" for k, v in SHORT.items()]], optimized=True)  # 370 steps
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "vae" / "fit.json").read_text())
    assert info["heldout_psnr"] >= VAE_PSNR_SHORT, info
    final = read_metrics(str(tmp_path))[SHORT["train.num_steps"]]
    assert final["eval/vae_psnr"] >= VAE_PSNR_SHORT, final
    assert final["eval/exemplar_following"] >= SCORE_SHORT, final
    assert final["eval/exemplar_following"] > 2 * ex.CHANCE
    # the final console line carries the scores; the held-out grid was written
    done = [line for line in r.stderr.splitlines() if " done: " in line]
    assert done and "eval/exemplar_following" in done[-1] and "eval/vae_psnr" in done[-1], done
    assert list((tmp_path / "images").glob("exemplar_*.png"))
