r"""Convert Paint-by-Example checkpoints between formats.

  # the released diffusers repo -> an orbax params checkpoint
  python -m pbe_jax.convert --from diffusers --src Fantasy-Studio/Paint-by-Example \
      --to orbax --dst /ckpt/pbe_orbax

  # the original model.ckpt -> diffusers, fp16 weights as the `fp16` variant
  python -m pbe_jax.convert --from ldm --src model.ckpt --to diffusers --dst /ckpt/pbe \
      --dtype fp16 --variant fp16

  # the paper's training init (SD v1-4 + CLIP ViT-L/14 vision tower) -> orbax
  python -m pbe_jax.convert --from sd-init --src CompVis/stable-diffusion-v1-4 \
      --clip openai/clip-vit-large-patch14 --to orbax --dst /ckpt/pbe_init

  # a training run (newest checkpoint of the workdir, EMA params) -> diffusers
  python -m pbe_jax.convert --from orbax --src /runs/pbe_sd15 --use-ema --to diffusers --dst /ckpt/mine

`--model-config` gives the architecture (required for `ldm` checkpoints that are not the released
model; otherwise a check): a JSON file `{"unet": {...}, "vae": {...}, "image_encoder": {...}}`, a
diffusers PbE directory, or a training config `configs/pbe.py:demo`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time

FORMATS_IN = ("diffusers", "ldm", "sd-init", "orbax")
FORMATS_OUT = ("diffusers", "orbax")
DTYPES = ("fp32", "fp16", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS_IN)
    p.add_argument("--src", required=True, help="checkpoint path or Hub repo id")
    p.add_argument("--clip", default=None, help="sd-init: the CLIP vision tower (transformers dir / Hub id)")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS_OUT)
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype of the saved weights")
    p.add_argument("--variant", default=None,
                   help="diffusers variant name of the saved weight files (e.g. fp16)")
    p.add_argument("--src-variant", default=None, help="variant of the diffusers weights to read")
    p.add_argument("--revision", default=None, help="Hub revision of --src / --clip")
    p.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN",
                   help="glob over '<component>.<key>' names that may be absent (kept at init); repeatable")
    p.add_argument("--use-ema", action="store_true",
                   help="load EMA params (orbax training / LDM checkpoints)")
    p.add_argument("--model-config", default=None,
                   help="architecture: JSON file, diffusers dir, or configs/pbe.py:ARG")
    p.add_argument("--seed", type=int, default=0, help="seed of freshly initialised params (sd-init)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def read_model_config(spec: str | None):
    """--model-config -> {'unet': {...}, 'vae': {...}, 'image_encoder': {...}} or None."""
    if spec is None:
        return None
    if os.path.isdir(spec):
        out = {}
        for comp in ("unet", "vae", "image_encoder"):
            with open(os.path.join(spec, comp, "config.json")) as f:
                out[comp] = json.load(f)
        return out
    file, _, arg = spec.partition(":")
    if file.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location("pbe_user_config", file)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.get_config(arg or None).model.to_dict()
    with open(spec) as f:
        raw = json.load(f)
    return raw.get("model", raw)  # a training config.json holds it under "model"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import numpy as np  # noqa: PLC0415 (keep --help fast)

    from pbe_jax.convert.load import load_pipeline, param_counts  # noqa: PLC0415
    from pbe_jax.models.hub import cast_dtype  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        model, report = load_pipeline(
            args.src_format, args.src, clip=args.clip, model_config=read_model_config(args.model_config),
            seed=args.seed, variant=args.src_variant, revision=args.revision,
            allow_missing=args.allow_missing, use_ema=args.use_ema, progress=not args.no_progress,
            return_report=True)
    except (OSError, ValueError, KeyError) as e:  # mismatches, bad files, bad configs: the message says it
        print(f"error: cannot load {args.src_format} checkpoint {args.src}:\n{e}", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    out = model.save_pretrained(args.dst, dtype=args.dtype if args.dtype != "fp32" else None,
                                variant=args.variant, format=args.dst_format,
                                progress=not args.no_progress)
    t2 = time.perf_counter()
    counts = param_counts(model)
    print(report.summary())
    print(f"wrote {args.dst_format} checkpoint {out} ({np.dtype(cast_dtype(args.dtype)).name} weights"
          + (f", variant {args.variant}" if args.variant else "") + ")")
    for comp, n in counts.items():
        print(f"  {comp:<14} {n:>14,d} params")
    print(f"  {'total':<14} {sum(counts.values()):>14,d} params; read {t1 - t0:.1f}s, write {t2 - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
