"""Objects the demo never saw (`pbe_jax.evaluation.new_objects`): the folder a user would train
on, and the held-out score that tells a model that learnt the new colours from one that paints
the nearest colour it knew."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pbe_jax.configs import load_config
from pbe_jax.data.config import data_config
from pbe_jax.data.sources import folder_source
from pbe_jax.data.synthetic import NOVEL_PALETTE, PALETTE, draw_scene
from pbe_jax.evaluation import exemplar as ex
from pbe_jax.evaluation.new_objects import novel_triplets, write_folder
from tests.train_utils import CONFIG_FILE, REPO, subprocess_env


@pytest.fixture(scope="module")
def demo():
    return load_config(f"{CONFIG_FILE}:demo")


@pytest.fixture(scope="module")
def triplets(demo):
    return novel_triplets(demo.data, 32)


def _paint(triplets, rgb):
    """The sources with the hole grey and the scored region filled with `rgb` [N, 3]."""
    out = triplets.source.copy()
    out[triplets.edit] = 128
    for i, c in enumerate(rgb):
        out[i][triplets.region[i]] = np.asarray(c).astype(np.uint8)
    return out


def test_novel_colours_are_far_from_the_demo_palette():
    d = np.linalg.norm(NOVEL_PALETTE[:, None] - PALETTE[None], axis=-1)
    assert d.min() >= 67, d.min(axis=1)
    chroma = NOVEL_PALETTE.max(axis=1) - NOVEL_PALETTE.min(axis=1)
    assert (chroma >= ex.CHROMA_MIN).all()
    # the demo's own scenes are unchanged by the colours= argument's default
    a = draw_scene(3, seed=0, style="palette")
    b = draw_scene(3, seed=0, style="palette", colours=PALETTE)
    np.testing.assert_array_equal(a.image, b.image)
    with pytest.raises(ValueError, match="colours= is for the 'palette' style"):
        draw_scene(0, style="identity", colours=NOVEL_PALETTE)


def test_score_tells_new_colours_from_the_nearest_known_one(triplets):
    n = len(triplets) // 2
    k = len(PALETTE)
    assert (triplets.ref_colour >= k).all() and (triplets.src_colour >= k).all()  # new colours only
    assert (triplets.ref_colour[n:] != triplets.src_colour[n:]).all()
    assert len(set(triplets.ref_colour[n:].tolist())) == len(NOVEL_PALETTE)
    colours = triplets.colours
    perfect = ex.score_edits(_paint(triplets, colours[triplets.ref_colour]), triplets)
    assert perfect["exemplar_following"] == 1.0 and perfect["self_following"] == 1.0
    assert perfect["exemplar_closer"] == 1.0
    # a model that paints the demo colour nearest to the reference's new one learnt nothing new
    nearest_known = np.linalg.norm(colours[triplets.ref_colour][:, None] - PALETTE[None], axis=-1).argmin(1)
    known = ex.score_edits(_paint(triplets, PALETTE[nearest_known]), triplets)
    assert known["exemplar_following"] == 0.0 and known["self_following"] == 0.0
    copy = ex.score_edits(triplets.source, triplets)  # the masked object put back
    assert copy["exemplar_following"] == 0.0 and copy["self_following"] == 1.0
    rng = np.random.default_rng(0)
    chance = np.mean([ex.score_edits(_paint(triplets, NOVEL_PALETTE[rng.integers(0, 4, 2 * n)]),
                                     triplets)["exemplar_following"] for _ in range(8)])
    assert abs(chance - 0.25) < 0.08, chance  # 256 draws: std 0.027
    # the demo's own triplets still score against the 8 demo colours only
    assert ex.heldout_triplets(data_config("demo"), 2, seed=1000).palette is None


def test_written_folder_trains_through_the_folder_source(tmp_path, demo):
    out = tmp_path / "mine"
    counts = write_folder(str(out), 12)
    assert sum(counts.values()) == 12 and set(counts) == {"spring", "apricot", "magenta", "azure"}
    names = sorted(os.listdir(out))
    assert len(names) == 24 and names[:2] == ["novel_0000.png", "novel_0000_mask.png"]
    for i in range(12):
        img = np.asarray(Image.open(out / f"novel_{i:04d}.png"))
        mask = np.asarray(Image.open(out / f"novel_{i:04d}_mask.png"))
        assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {0, 255}
        assert 72 <= min(img.shape[:2]) and max(img.shape[:2]) <= 128
        obj = img[mask == 255].astype(np.float32)  # the masked object is one new colour
        mean = obj.mean(axis=0)
        to_new, to_demo = (np.linalg.norm(p - mean, axis=1).min() for p in (NOVEL_PALETTE, PALETTE))
        assert to_new < 30 and to_new < to_demo / 2, (mean, to_new, to_demo)
    cfg = demo.data.copy_and_resolve_references()
    cfg.source, cfg.images_dir = "folder", str(out)
    source = folder_source(cfg)
    assert len(source) == 12 and source.index_counts == {}, source.index_counts


def test_cli_write_and_a_missing_base(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "pbe_jax.tools.new_objects", *a],  # noqa: E731
                                    capture_output=True, text=True, env=subprocess_env(), cwd=REPO)
    p = run("write", f"--out={tmp_path / 'imgs'}", "--num=3")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wrote 3 images + masks" in p.stdout and len(os.listdir(tmp_path / "imgs")) == 6
    p = run("proof", f"--base={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'w'}")
    assert p.returncode != 0 and "holds no pbe_jax training checkpoint" in p.stderr


def test_cli_score_of_a_diffusers_model(tmp_path):
    """`score` on a model folder that is no training run: the demo's geometry at the model's own
    resolution; every score (a share) and the VAE ceiling land in --json_out, for both sets."""
    from tests.test_weights_diffusers import tiny_pipeline
    tiny_pipeline(seed=5).save_pretrained(str(tmp_path / "pbe"))
    out = tmp_path / "scores.json"
    p = subprocess.run([sys.executable, "-m", "pbe_jax.tools.new_objects", "score",
                        f"--model={tmp_path / 'pbe'}", "--num=6", "--sample_steps=2", f"--json_out={out}"],
                       capture_output=True, text=True, env=subprocess_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    scores = json.loads(out.read_text())["scores"]
    assert set(scores) == {"novel", "demo"}
    for s in scores.values():
        assert set(s) == {"exemplar_following", "exemplar_closer", "self_following",
                          "psnr_outside_mask", "vae_colour_kept"}, s
        assert all(0.0 <= s[k] <= 1.0 for k in s if k != "psnr_outside_mask"), s
    assert json.loads(p.stdout) == scores
