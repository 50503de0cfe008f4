r"""Batch inference: `python -m pbe_jax.sample`.

  # a manifest (.jsonl rows {"source", "mask", "reference"[, "id", "seed"]}, or a .csv with those
  # columns; relative paths are relative to the manifest):
  python -m pbe_jax.sample --model=Fantasy-Studio/Paint-by-Example --manifest=edits.jsonl \
      --out=results/ --batch_size=8 --steps=50 --guidance=5 --scheduler=plms --num_samples=2

  # one edit:
  python -m pbe_jax.sample --model=DIR --source=s.png --mask=m.png --reference=r.png --out=out.png

`--model` is a diffusers PbE repo (dir or hub id) or a pbe_jax training workdir / checkpoint.
Results are `<out>/<id>_<k>.png` plus `<out>/settings.json`; a rerun skips rows whose outputs
exist. A bad row (missing file, unreadable image, empty mask, mask size differs from the source)
is reported with its reason and the rest go on; the exit code is 1 if any row failed. Rows are
grouped by source size into batches; each output's noise comes from its own seed (row seed + k),
so results do not depend on the batching or the number of devices. Sources larger than the
model's resolution are edited in a window around the mask grown by `--mask_crop_padding` px
(default 32; -1 edits the whole image) at the model's resolution and pasted back.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import flags

from pbe_jax import distributed
from pbe_jax.batch_edit import Row, read_manifest, write_results
from pbe_jax.metrics import setup_logging
from pbe_jax.models.hub import cast_dtype
from pbe_jax.pipeline import PaintByExample
from pbe_jax.schedulers import scheduler_names
from pbe_jax.sharding import make_mesh

log = logging.getLogger("pbe_jax")


def _settings(flags_) -> dict:
    keys = ("model", "steps", "guidance", "scheduler", "seed", "num_samples", "paste_back",
            "reference_preprocess", "batch_size", "dtype", "mask_crop_padding")
    return {k: getattr(flags_, k) for k in keys}


def main(argv) -> int:
    del argv
    F = flags.FLAGS
    distributed.initialize_from_flags()
    setup_logging()
    single = F.source or F.mask or F.reference
    if single and not (F.source and F.mask and F.reference):
        raise SystemExit("--source, --mask and --reference go together")
    if not single and not F.manifest:
        raise SystemExit("give --manifest FILE, or --source/--mask/--reference")
    pipe = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype))
    mesh = make_mesh("data:-1") if jax.device_count() > 1 else None
    kw = dict(log=log, batch_size=F.batch_size, steps=F.steps, guidance=F.guidance, scheduler=F.scheduler,
              num_samples=F.num_samples, paste_back=F.paste_back,
              reference_preprocess=F.reference_preprocess, mesh=mesh,
              mask_crop_padding=F.mask_crop_padding if F.mask_crop_padding >= 0 else None)
    if single:
        out_dir = os.path.dirname(os.path.abspath(F.out))
        stem = os.path.splitext(os.path.basename(F.out))[0]
        row = Row(id=stem, source=F.source, mask=F.mask, reference=F.reference, seed=F.seed)
        _, failed = write_results(pipe, [row], out_dir, **{**kw, "num_samples": 1})
        if not failed and jax.process_index() == 0:
            os.replace(os.path.join(out_dir, f"{stem}_0.png"), F.out)
        rows = [row]
    else:
        rows = read_manifest(F.manifest, F.seed)
        _, failed = write_results(pipe, rows, F.out, **kw)
        if jax.process_index() == 0:
            with open(os.path.join(F.out, "settings.json"), "w") as f:
                json.dump(_settings(F), f, indent=2)
    done = len(rows) - len(failed)
    print(f"summary: {done}/{len(rows)} rows done, {len(failed)} failed")
    for rid, reason in failed.items():
        print(f"  failed {rid}: {reason}")
    return 1 if failed else 0


def define_flags() -> None:
    flags.DEFINE_string("model", None, "diffusers PbE repo (dir or hub id) or a pbe_jax workdir/checkpoint")
    flags.DEFINE_string("manifest", None, ".jsonl or .csv with source, mask, reference[, id, seed]")
    flags.DEFINE_string("out", None, "output directory (manifest) or file (single edit)")
    flags.DEFINE_string("source", None, "single edit: source image")
    flags.DEFINE_string("mask", None, "single edit: mask (white = edit)")
    flags.DEFINE_string("reference", None, "single edit: reference image")
    flags.DEFINE_integer("batch_size", 4, "images per device batch (all devices together)")
    flags.DEFINE_integer("steps", 50, "denoising steps")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale (1 = off)")
    flags.DEFINE_enum("scheduler", "plms", scheduler_names(), "sampler")
    flags.DEFINE_integer("seed", 0, "base seed (rows without a seed use seed + 1000 * row)")
    flags.DEFINE_integer("num_samples", 1, "outputs per row")
    flags.DEFINE_bool("paste_back", False, "blend the source back outside a feathered mask")
    flags.DEFINE_enum("reference_preprocess", "squash", ["squash", "center_crop"], "reference resize")
    flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "compute dtype")
    flags.DEFINE_integer("mask_crop_padding", 32, "sources larger than the model's resolution: edit a "
                         "window around the mask grown by this many px, at the model's resolution "
                         "(-1: edit the whole image)", lower_bound=-1)
    flags.mark_flags_as_required(["model", "out"])
    distributed.define_flags()




if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
