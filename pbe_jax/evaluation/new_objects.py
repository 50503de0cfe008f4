"""Objects the demo model never saw: a folder of "your own images" and a held-out score for them.

The demo trains on 'palette' scenes whose objects have one of the 8 `PALETTE` colours. Here the
objects have the 4 `NOVEL_PALETTE` colours instead (`pbe_jax.data.synthetic`: spring, apricot,
magenta, azure; each 67 RGB levels or more from every demo colour), on the same kind of scenes:

- `write_folder` writes them as a user's folder (`NAME.png` + `NAME_mask.png`, white = the
  object), what `config.data.source=folder` reads, to fine-tune a demo model on;
- `novel_triplets` / `score_model` score a model on held-out scenes of those colours (synthetic
  seed `seed`, never written by `write_folder`'s default seed), with the demo's own scores
  (`pbe_jax.evaluation.exemplar.score_edits`) but a painted colour matched against all 12
  colours: painting the nearest demo colour instead of the reference's new one is a miss.
  `exemplar_following` (cross references: paint *another* scene's object here) is the headline;
  chance is 1/4 (a random novel colour) and a model that paints only demo colours scores 0.

`pbe_jax.tools.new_objects` is the command line (`write`, `score`, and `proof`: base vs LoRA
vs full fine-tuning on the same folder, the README's "Train on your own images" numbers).
"""
from __future__ import annotations

import os

import numpy as np

from pbe_jax.data.synthetic import NOVEL_NAMES, NOVEL_PALETTE, draw_scene
from pbe_jax.evals.reconstruction import reconstruct
from pbe_jax.evaluation.exemplar import (Triplets, edit_triplets, heldout_triplets, painted_colours,
                                         score_edits)
from pbe_jax.outputs import write_png

MIN_VISIBLE = 0.98  # an object trained on is whole: nothing drawn later covers it
WRITE_SEED = 1  # the folder's scenes; the demo trains on seed 0 and scores on 1000
SCORE_SEED = 1000


def write_folder(out_dir: str, num: int, *, seed: int = WRITE_SEED, min_side: int = 72,
                 max_side: int = 128, colours: np.ndarray = NOVEL_PALETTE) -> dict[str, int]:
    """`num` 'palette' scenes of `colours` as `out_dir/novel_NNNN.png` + `novel_NNNN_mask.png`
    (255 = the largest object nothing covers; scenes without one are passed over). Sides drawn
    in [min_side, max_side] (the demo's scenes: 72 to 128). Returns {colour name: images}."""
    if num < 1:
        raise ValueError(f"write_folder: num={num}, expected at least 1 image")
    os.makedirs(out_dir, exist_ok=True)
    names = NOVEL_NAMES if colours is NOVEL_PALETTE else tuple(f"colour{i}" for i in range(len(colours)))
    counts = dict.fromkeys(names, 0)
    index = written = 0
    while written < num:
        if index > 50 * num:
            raise RuntimeError(f"only {written} of {num} scenes have an object nothing covers")
        scene = draw_scene(index, seed=seed, min_side=min_side, max_side=max_side, style="palette",
                           colours=colours)
        index += 1
        whole = [k for k in range(len(scene.boxes)) if scene.visible[k] >= MIN_VISIBLE]
        if not whole:
            continue
        k = max(whole, key=lambda k: int((scene.owner == k).sum()))
        stem = os.path.join(out_dir, f"novel_{written:04d}")
        write_png(f"{stem}.png", scene.image)
        write_png(f"{stem}_mask.png", np.where(scene.owner == k, 255, 0).astype(np.uint8))
        counts[names[int(scene.colours[k])]] += 1
        written += 1
    return counts


def novel_triplets(data_cfg, num: int, seed: int = SCORE_SEED) -> Triplets:
    """`num` self + `num` cross-reference held-out triplets of NOVEL_PALETTE objects at the
    geometry of `data_cfg` (a demo run's `config.data`), colours matched against all 12."""
    return heldout_triplets(data_cfg, num, seed, style="palette", colours=NOVEL_PALETTE)


def score_model(pipe, data_cfg, *, num: int = 64, seed: int = SCORE_SEED, steps: int = 20,
                guidance: float = 5.0, scheduler: str | None = None) -> dict[str, dict[str, float]]:
    """{'novel': scores on NOVEL_PALETTE objects, 'demo': the same on the demo's own PALETTE
    scenes (what fine-tuning should not forget)}, each `score_edits`' dict, from `num` self +
    `num` cross triplets of synthetic seed `seed`, plus `vae_colour_kept`: the share of the
    held-out objects whose colour survives the model's VAE (encode + decode of the untouched
    source), the most a model with that frozen VAE can score."""
    sets = {"novel": novel_triplets(data_cfg, num, seed),
            "demo": heldout_triplets(data_cfg, num, seed, style="palette")}
    edited = edit_triplets(pipe, list(sets.values()), steps=steps, guidance=guidance,
                           scheduler=scheduler)
    edited = np.split(edited, np.cumsum([len(t) for t in sets.values()])[:-1])
    out = {}
    for (name, t), e in zip(sets.items(), edited):
        out[name] = score_edits(e, t)
        n = len(t) // 2  # the self half: each held-out scene once
        kept = painted_colours(reconstruct(pipe.vae, t.source[:n]), t.region[:n], t.hue, t.palette)
        out[name]["vae_colour_kept"] = float((kept == t.src_colour[:n]).mean())
    return out
