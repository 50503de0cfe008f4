r"""Batch inference: `python -m pbe_jax.sample`.

  # a manifest (.jsonl rows {"source", "mask", "reference"[, "id", "seed"]}, or a .csv with those
  # columns; relative paths are relative to the manifest):
  python -m pbe_jax.sample --model=Fantasy-Studio/Paint-by-Example --manifest=edits.jsonl \
      --out=results/ --batch_size=8 --steps=50 --guidance=5 --scheduler=plms --num_samples=2

  # one edit:
  python -m pbe_jax.sample --model=DIR --source=s.png --mask=m.png --reference=r.png --out=out.png

`--model` is a diffusers PbE repo (dir or hub id) or a pbe_jax training workdir / checkpoint.
Results are `<out>/<id>_<k>.png` plus `<out>/settings.json` (the generation settings and which
weights, e.g. training step 3, made them; written with the first output). One run writes an
`--out` at a time (a lock; `--reclaim_lock` takes over one whose holder is gone). A rerun skips
rows whose outputs decode and carry this run's tag, and refuses settings or weights other than
those recorded (naming the differences) unless `--overwrite`, which redoes every row. An output
never replaces an input of the manifest, nor (without `--overwrite`) a file pbe_jax did not
write. A bad row (missing file, unreadable image, an input over `--max_source_pixels`, empty
mask, mask size differs from the source, an id that is not a plain file name, a source over
`--max_pixels`, an output name taken by an input or an unrelated file, a failure on the device)
is reported with its reason and the rest go on; the exit code is 1 if any row failed. Pixels
are decoded batch by batch, so memory does not grow with the manifest. Rows are grouped by source size
into batches; each output's noise comes from its own seed (row seed + k), so results do not
depend on the batching or the number of devices.
Sources larger than the model's resolution are edited in a window around the mask grown by
`--mask_crop_padding` px (default 32; -1 edits the whole image) at the model's resolution and
pasted back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import jax
from absl import flags

from pbe_jax import cli_flags, distributed, locks
from pbe_jax.batch_edit import (INPUTS, MAX_SOURCE_PIXELS, Row, check_settings, check_weights, foreign_file,
                                loaded_weights, read_manifest, read_tag, write_results)
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
    if flags_.lora:  # a LoRA on the model changes every output
        out.update(lora=os.path.abspath(flags_.lora) if os.path.exists(flags_.lora) else flags_.lora,
                   lora_scale=flags_.lora_scale)
    if os.path.exists(out["model"]):  # a local model: the same wherever the command runs from
        out["model"] = os.path.abspath(out["model"])
    return out


def _single_edit_target(F) -> str:
    """The file a single edit writes (--out), refused when it is one of the inputs, or a file
    pbe_jax did not write (unless --overwrite)."""
    out = os.path.abspath(F.out)
    for what in INPUTS:
        if os.path.realpath(out) == os.path.realpath(getattr(F, what)):
            raise ValueError(f"--out {F.out} is the --{what} file: an output never replaces an input; "
                             "give another --out")
    if os.path.lexists(out) and read_tag(out) is None and not F.overwrite:
        raise ValueError(f"--out {foreign_file(F.out)}")
    return out


def _load(F, out: str | None):
    """The model, and which weights it is (checked against --out's earlier results)."""
    pipe, report = PaintByExample.from_pretrained(F.model, dtype=cast_dtype(F.dtype), use_ema=F.use_ema,
                                                  variant=F.variant, revision=F.revision,
                                                  return_report=True)
    pipe = pipe.with_lora(F.lora, F.lora_scale, F.use_ema)  # --lora (none: the same pipe)
    weights = loaded_weights(report, use_ema=F.use_ema)
    if out is not None:
        try:
            check_weights(out, weights, overwrite=F.overwrite)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return pipe, weights


def _check_flags(F) -> None:
    single = F.source or F.mask or F.reference
    if single and not (F.source and F.mask and F.reference):
        raise SystemExit("--source, --mask and --reference go together")
    if not single and not F.manifest:
        raise SystemExit("give --manifest FILE, or --source/--mask/--reference")
    for name in ("num_samples", "batch_size", "steps"):
        if getattr(F, name) < 1:
            raise SystemExit(f"error: --{name}={getattr(F, name)}: must be at least 1")
    for name in ("max_pixels", "max_source_pixels"):
        if getattr(F, name) is not None and getattr(F, name) < 0:
            raise SystemExit(f"error: --{name}={getattr(F, name)}: must be >= 0 (0 = no limit)")


def main(argv) -> int:
    del argv
    F = flags.FLAGS
    distributed.initialize_from_flags()
    setup_logging()
    _check_flags(F)
    single = bool(F.source)
    # Everything that can be checked is checked before the model is loaded.
    with contextlib.ExitStack() as stack:
        try:
            ensure_writable(os.path.dirname(os.path.abspath(F.out)) if single else F.out, "--out")
            if single:
                target = _single_edit_target(F)
            else:
                rows = read_manifest(F.manifest, F.seed)
                # One run writes an --out folder at a time (a single edit writes one file, whole).
                stack.enter_context(locks.hold(F.out, "--out", enabled=jax.process_index() == 0,
                                               reclaim=F.reclaim_lock))
                check_settings(F.out, _settings(F), overwrite=F.overwrite)
        except (NotWritableError, ValueError, locks.LockedError) as e:
            raise SystemExit(f"error: {e}") from None
        return _run(F, rows=None if single else rows, target=target if single else None)


def _run(F, *, rows: list[Row] | None, target: str | None) -> int:
    pipe, weights = _load(F, None if target else F.out)
    mesh = make_mesh("data:-1") if jax.device_count() > 1 else None
    kw = dict(log=log, batch_size=F.batch_size, steps=F.steps, guidance=F.guidance, scheduler=F.scheduler,
              num_samples=F.num_samples, paste_back=F.paste_back,
              reference_preprocess=F.reference_preprocess, mesh=mesh,
              max_pixels=AUTO if F.max_pixels is None else F.max_pixels or None,
              max_source_pixels=F.max_source_pixels or None,
              mask_crop_padding=F.mask_crop_padding if F.mask_crop_padding >= 0 else None)
    if target:
        stem = os.path.splitext(os.path.basename(target))[0]
        row = Row(id=stem, source=F.source, mask=F.mask, reference=F.reference, seed=F.seed,
                  outputs=[target])
        # checked above: --out is ours (a single edit is always redone) or --overwrite was given
        _, failed = write_results(pipe, [row], os.path.dirname(target), overwrite=True,
                                  **{**kw, "num_samples": 1})
        rows = [row]
    else:
        # settings.json is written before the first output, so a run where every row failed
        # leaves none and a corrected rerun is not refused
        _, failed = write_results(pipe, rows, F.out, overwrite=F.overwrite,
                                  settings={**_settings(F), "weights": weights}, **kw)
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
    flags.DEFINE_string("lora", None, "a LoRA on --model: a pbe_jax LoRA run or a diffusers/PEFT .safetensors")
    flags.DEFINE_float("lora_scale", 1.0, "--lora: its adapters' output times this")
    flags.DEFINE_integer("max_pixels", None, "largest working size (px after padding); larger sources "
                         "fail with a message (default: the model's own, from its latent size: 768x768 "
                         "for SD v1, 192x192 for the demo; 0 = no limit)")
    flags.DEFINE_integer("max_source_pixels", MAX_SOURCE_PIXELS, "largest input image (source, mask, "
                         "reference) decoded, in px, read from the file header; larger ones fail "
                         "with a message (0 = no limit)")
    flags.DEFINE_bool("overwrite", False, "redo every row, also when --out holds results made with "
                      "other settings or other weights, replacing files pbe_jax did not write (never "
                      "an input)")
    flags.DEFINE_bool("reclaim_lock", False, "take over --out's lock from a run that is gone (e.g. on "
                      "a host that died); a live holder on this host is never displaced")
    flags.DEFINE_integer("mask_crop_padding", 32, "sources larger than the model's resolution: edit a "
                         "window around the mask grown by this many px, at the model's resolution "
                         "(-1: edit the whole image)", lower_bound=-1)
    flags.mark_flags_as_required(["model", "out"])
    distributed.define_flags()




if __name__ == "__main__":
    define_flags()
    cli_flags.run(lambda argv: sys.exit(main(argv)))
