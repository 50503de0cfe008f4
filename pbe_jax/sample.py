r"""Batch inference: `python -m pbe_jax.sample`.

  # a manifest (.jsonl rows {"source", "mask", "reference"[, "id", "seed"]}, or a .csv with those
  # columns; relative paths are relative to the manifest):
  python -m pbe_jax.sample --model=Fantasy-Studio/Paint-by-Example --manifest=edits.jsonl \
      --out=results/ --batch_size=8 --steps=50 --guidance=5 --scheduler=plms --num_samples=2

  # one edit:
  python -m pbe_jax.sample --model=DIR --source=s.png --mask=m.png --reference=r.png --out=out.png

`--model` is a diffusers PbE repo (dir or hub id) or a pbe_jax training workdir / checkpoint.
Results are `<out>/<id>_<k>.png` plus `<out>/settings.json` (the generation settings); a rerun
skips rows whose outputs exist and decode, and refuses settings other than those recorded
(naming the differences) unless `--overwrite`, which redoes every row. A bad row (missing file,
unreadable or too large image, empty mask, mask size differs from the source, an id that is not
a plain file name, a source over `--max_pixels`, a failure on the device) is reported with its
reason and the rest go on; the exit code is 1 if any row failed. Rows are grouped by source size
into batches; each output's noise comes from its own seed (row seed + k), so results do not
depend on the batching or the number of devices.
Sources larger than the model's resolution are edited in a window around the mask grown by
`--mask_crop_padding` px (default 32; -1 edits the whole image) at the model's resolution and
pasted back.
"""
from __future__ import annotations

import logging
import os
import sys

import jax
from absl import flags

from pbe_jax import cli_flags, distributed
from pbe_jax.batch_edit import Row, check_settings, read_manifest, write_results, write_settings
from pbe_jax.inference import AUTO
from pbe_jax.metrics import setup_logging
from pbe_jax.models.hub import cast_dtype
from pbe_jax.outputs import NotWritableError, ensure_writable
from pbe_jax.pipeline import PaintByExample
from pbe_jax.sharding import make_mesh

log = logging.getLogger("pbe_jax")


def _settings(flags_) -> dict:
    """The settings an output depends on (not the batch size: results do not depend on it)."""
    keys = ("model", "steps", "guidance", "scheduler", "seed", "num_samples", "paste_back",
            "reference_preprocess", "dtype", "use_ema", "variant", "revision", "mask_crop_padding")
    out = {k: getattr(flags_, k) for k in keys}
    if os.path.exists(out["model"]):  # a local model: the same wherever the command runs from
        out["model"] = os.path.abspath(out["model"])
    return out


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
    # Everything that can be checked is checked before the model is loaded.
    try:
        ensure_writable(os.path.dirname(os.path.abspath(F.out)) if single else F.out, "--out")
        if not single:
            rows = read_manifest(F.manifest, F.seed)
            check_settings(F.out, _settings(F), overwrite=F.overwrite)
    except (NotWritableError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    pipe = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype), use_ema=F.use_ema,
                                          variant=F.variant, revision=F.revision)
    mesh = make_mesh("data:-1") if jax.device_count() > 1 else None
    kw = dict(log=log, batch_size=F.batch_size, steps=F.steps, guidance=F.guidance, scheduler=F.scheduler,
              num_samples=F.num_samples, paste_back=F.paste_back,
              reference_preprocess=F.reference_preprocess, mesh=mesh, max_pixels=AUTO if F.max_pixels is None else F.max_pixels or None,
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
        write_settings(F.out, _settings(F))  # first: a partial run's outputs are described too
        _, failed = write_results(pipe, rows, F.out, overwrite=F.overwrite, **kw)
    done = len(rows) - len(failed)
    print(f"summary: {done}/{len(rows)} rows done, {len(failed)} failed")
    for rid, reason in failed.items():
        print(f"  failed {rid}: {reason}")
    return 1 if failed else 0


def define_flags() -> None:
    cli_flags.define_model_flags()
    flags.DEFINE_string("manifest", None, ".jsonl or .csv with source, mask, reference[, id, seed]")
    flags.DEFINE_string("out", None, "output directory (manifest) or file (single edit)")
    flags.DEFINE_string("source", None, "single edit: source image")
    flags.DEFINE_string("mask", None, "single edit: mask (white = edit)")
    flags.DEFINE_string("reference", None, "single edit: reference image")
    flags.DEFINE_integer("batch_size", 4, "images per device batch (all devices together)")
    flags.DEFINE_integer("num_samples", 1, "outputs per row")
    flags.DEFINE_bool("paste_back", False, "blend the source back outside a feathered mask")
    flags.DEFINE_enum("reference_preprocess", "squash", ["squash", "center_crop"], "reference resize")
    flags.DEFINE_integer("max_pixels", None, "largest working size (px after padding); larger sources "
                         "fail with a message (default: the model's own, from its latent size: 768x768 "
                         "for SD v1, 192x192 for the demo; 0 = no limit)")
    flags.DEFINE_bool("overwrite", False, "redo every row, also when --out holds results made with "
                      "other settings")
    flags.DEFINE_integer("mask_crop_padding", 32, "sources larger than the model's resolution: edit a "
                         "window around the mask grown by this many px, at the model's resolution "
                         "(-1: edit the whole image)", lower_bound=-1)
    flags.mark_flags_as_required(["model", "out"])
    distributed.define_flags()




if __name__ == "__main__":
    define_flags()
    cli_flags.run(lambda argv: sys.exit(main(argv)))
