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

  # a training run (newest checkpoint of the workdir, EMA params) -> diffusers, with a model card
  # (training config, the run's evaluation metrics); list what --push_to_hub would upload
  python -m pbe_jax.convert --from orbax --src /runs/pbe_sd15 --use-ema --to diffusers --dst /ckpt/mine \
      --push_to_hub me/pbe-mine --dry_run

  # a LoRA run (config.train.lora.rank > 0): its adapters as diffusers/PEFT
  # pytorch_lora_weights.safetensors, or its base (config.init_from) with them merged in
  python -m pbe_jax.convert --from orbax --src /runs/my_lora --to diffusers_lora --dst /ckpt/my_lora
  python -m pbe_jax.convert --from orbax --src /runs/my_lora --fuse_lora --to diffusers --dst /ckpt/merged

  # one original-layout (LDM) file, for tools that load single-file checkpoints
  python -m pbe_jax.convert --from diffusers --src /ckpt/mine --to ldm --dst /ckpt/mine.safetensors

`--model-config` gives the architecture (required for `ldm` checkpoints that are not the released
model; otherwise a check): a JSON file `{"unet": {...}, "vae": {...}, "image_encoder": {...}}`, a
diffusers PbE directory, or a training config `configs/pbe.py:demo`. An LDM `.safetensors` written
by `--to ldm` carries its architecture and needs none.

An export is written whole: into a hidden temporary sibling of `--dst`, renamed into place at the
end, so an interrupted export (an error, Ctrl-C, SIGTERM) leaves `--dst` as it was. A `--dst`
that already holds files is refused unless `--overwrite` (which replaces a previous export, never
an unrelated folder); a `--dst` inside a training workdir is refused (an export there would change
what `--model=WORKDIR` loads). One export writes a `--dst` at a time (a lock names the other).

`--push_to_hub REPO` uploads the written folder (diffusers or orbax) to the Hub model repo REPO with
huggingface_hub (token from `huggingface-cli login` / HF_TOKEN); `--dry_run` only lists the files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Sequence

import numpy as np
from absl import flags

from pbe_jax.checkpoint import CheckpointError
from pbe_jax.configs import load_config
from pbe_jax.convert import lora_io
from pbe_jax.convert.export import LDM_SUFFIXES, Destination, DestinationError
from pbe_jax.convert.load import FORMATS, load_pipeline, param_counts
from pbe_jax.convert.model_card import card_info
from pbe_jax.models.exemplar import export_refusal
from pbe_jax.models.hub import cast_dtype, push_to_hub
from pbe_jax import locks
from pbe_jax.locks import LockedError
from pbe_jax.models.registry import COMPONENTS
from pbe_jax.outputs import NotWritableError, ensure_writable
from pbe_jax.pipeline import PaintByExample

FORMATS_OUT = ("diffusers", "orbax", "ldm", "diffusers_lora")
DTYPES = ("fp32", "fp16", "bf16")


def make_flags() -> flags.FlagValues:
    """This command's flags, in a FlagValues of their own (so `main(argv)` can be called again).
    Multi-word flags take '_' or '-' (`--use_ema` / `--use-ema`)."""
    fv = flags.FlagValues()
    flags.DEFINE_enum("from", None, list(FORMATS), "source checkpoint format", flag_values=fv)
    flags.DEFINE_string("src", None, "checkpoint path or Hub repo id", flag_values=fv)
    flags.DEFINE_string("clip", None, "sd-init: the CLIP vision tower (transformers dir / Hub id)", flag_values=fv)
    flags.DEFINE_enum("to", None, list(FORMATS_OUT), "output format", flag_values=fv)
    flags.DEFINE_string("dst", None, "output directory (--to ldm: a .safetensors or .ckpt file)",
                        flag_values=fv)
    flags.DEFINE_enum("dtype", "fp32", list(DTYPES), "dtype of the saved weights", flag_values=fv)
    flags.DEFINE_string("variant", None, "diffusers variant name of the saved weight files (e.g. fp16)",
                        flag_values=fv)
    flags.DEFINE_string("src_variant", None, "variant of the diffusers weights to read", flag_values=fv)
    flags.DEFINE_string("revision", None, "Hub revision of --src / --clip", flag_values=fv)
    flags.DEFINE_multi_string("allow_missing", [], "glob over '<component>.<key>' names that may be "
                              "absent (kept at init); repeatable", flag_values=fv)
    flags.DEFINE_bool("use_ema", None, "load EMA params (orbax training / LDM checkpoints; default: a "
                      "training checkpoint's EMA params when it has them; --nouse_ema: the raw ones)", flag_values=fv)
    flags.DEFINE_string("model_config", None, "architecture: JSON file, diffusers dir, or configs/pbe.py:ARG",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of freshly initialised params (sd-init)", flag_values=fv)
    flags.DEFINE_bool("no_progress", False, "no progress bars", flag_values=fv)
    flags.DEFINE_string("max_shard_size", None, "diffusers: split weight files larger than this "
                        "(e.g. 5GB) into shards + index", flag_values=fv)
    flags.DEFINE_string("push_to_hub", None, "upload the written folder to this Hub model repo "
                        "(org/name)", flag_values=fv)
    flags.DEFINE_bool("fuse_lora", False, "--from orbax of a LoRA run: its base (config.init_from) "
                      "with the adapters merged in, an ordinary model", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "with --push_to_hub: list the files, upload nothing", flag_values=fv)
    flags.DEFINE_bool("private", False, "with --push_to_hub: create the repo private", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace the previous export at --dst (as a whole, once the "
                      "new one is written)", flag_values=fv)
    flags.DEFINE_bool("reclaim_lock", False, "take over --dst's lock left by a process on another host "
                      "that is known to be gone", flag_values=fv)
    for name in ("src_variant", "allow_missing", "use_ema", "model_config", "no_progress",
                 "max_shard_size", "push_to_hub", "dry_run", "reclaim_lock"):
        flags.DEFINE_alias(name.replace("_", "-"), name, flag_values=fv)
    for name in ("from", "src", "to", "dst"):
        flags.mark_flag_as_required(name, flag_values=fv)
    return fv


def read_model_config(spec: str | None):
    """--model-config -> the architecture {'unet': {...}, 'vae': {...}, 'image_encoder': {...}}
    (from a JSON file, a diffusers PbE directory or a training config `PATH.py:ARG`), or None."""
    if spec is None:
        return None
    if os.path.isdir(spec):
        out = {}
        for comp in COMPONENTS:
            with open(os.path.join(spec, comp, "config.json")) as f:
                out[comp] = json.load(f)
        return out
    if spec.partition(":")[0].endswith(".py"):
        model = load_config(spec).model.to_dict()
    else:
        with open(spec) as f:
            raw = json.load(f)
        model = raw.get("model", raw)  # a training config.json holds it under "model"
    return {c: model[c] for c in COMPONENTS}


def main(argv: Sequence[str] | None = None) -> int:
    fv = make_flags()
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help", "--helpfull"} & set(argv):
        print(__doc__ + "\n" + fv.get_help())
        return 0
    try:
        fv(["pbe_jax.convert", *argv])
    except flags.Error as e:
        print(f"error: {e}\n\n{__doc__}", file=sys.stderr)
        return 2
    f = fv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    src_format, dst_format = f["from"].value, f.to
    if f.push_to_hub and dst_format == "ldm":
        print("error: --push_to_hub uploads a folder (--to diffusers or orbax); an LDM checkpoint is "
              "one file", file=sys.stderr)
        return 2
    if dst_format == "ldm" and not f.dst.endswith(LDM_SUFFIXES):
        print(f"error: --dst {f.dst}: an LDM checkpoint is one file; name it *.safetensors (or *.ckpt "
              "for a PyTorch pickle)", file=sys.stderr)
        return 2
    if dst_format == "diffusers_lora":  # a LoRA run's adapters as pytorch_lora_weights.safetensors
        return _export_lora(f)
    try:  # before reading gigabytes: the export is written next to --dst, then renamed into place
        ensure_writable(os.path.dirname(os.path.abspath(f.dst)) if "://" not in f.dst else f.dst, "--dst")
        dest = Destination(f.dst, dst_format, overwrite=f.overwrite, reclaim=f.reclaim_lock).open()
    except (NotWritableError, DestinationError, LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with dest, _sigterm_exits():
        return _convert(f, dest, src_format, dst_format, f.max_shard_size)


def _export_lora(f) -> int:
    """`--to diffusers_lora`: one file, `DST/pytorch_lora_weights.safetensors`, written atomically
    (a temporary name, then a rename) under --dst's lock."""
    try:
        ensure_writable(f.dst, "--dst")
        with locks.hold(f.dst, "--dst", reclaim=f.reclaim_lock):
            out = lora_io.save_peft(lora_io.read_lora(f.src, use_ema=f.use_ema), f.dst)
    except (OSError, ValueError, KeyError, LockedError) as e:
        print(f"error: cannot export the LoRA of {f.src}:\n{e}", file=sys.stderr)
        return 1
    print(f"wrote diffusers/PEFT LoRA {out} ({os.path.getsize(out) / 2**20:.2f} MiB)")
    return 0


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit(143) while converting, so the temporary export is removed."""
    def handler(signum, frame):
        print("error: stopped by SIGTERM; --dst is as it was before this command", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _convert(f, dest: Destination, src_format: str, dst_format: str, shard) -> int:
    t0 = time.perf_counter()
    try:
        if f.fuse_lora:  # the run's base + its adapters, merged
            if src_format != "orbax" or not lora_io.is_lora_run(f.src):
                raise ValueError("--fuse_lora needs --from orbax --src <a LoRA run's workdir or step>")
            model, report = lora_io.load_run(f.src, use_ema=f.use_ema, cls=PaintByExample,
                                             return_report=True, progress=not f.no_progress)
            lora_io.merge(model)
        else:
            model, report = load_pipeline(
                src_format, f.src, clip=f.clip, model_config=read_model_config(f.model_config),
                seed=f.seed, variant=f.src_variant, revision=f.revision, allow_missing=f.allow_missing,
                use_ema=f.use_ema, progress=not f.no_progress, return_report=True, cls=PaintByExample)
    except (OSError, ValueError, KeyError, CheckpointError) as e:  # the message says what is wrong
        print(f"error: cannot load {src_format} checkpoint {f.src}:\n{e}", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    refusal = export_refusal(model.image_encoder, dst_format) if dst_format != "orbax" else None
    if refusal:  # diffusers' pipeline / the LDM code cannot hold this conditioner
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        out = dest.write(
            model, dtype=f.dtype if f.dtype != "fp32" else None, variant=f.variant,
            progress=not f.no_progress, max_shard_size=int(shard) if shard and shard.isdigit() else shard,
            repo_id=f.push_to_hub, card=card_info(src_format, f.src, use_ema=report.ema))
    except ValueError as e:  # an option the output format does not take
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: nothing of this export is left at --dst
        print(f"error: writing the export failed ({type(e).__name__}: {e}); --dst {f.dst} is as it was "
              "before this command", file=sys.stderr)
        return 1
    t2 = time.perf_counter()
    counts = param_counts(model)
    print(report.summary())
    print(f"wrote {dst_format} checkpoint {out} ({np.dtype(cast_dtype(f.dtype)).name} weights"
          + (f", variant {f.variant}" if f.variant else "") + ")")
    for comp, n in counts.items():
        print(f"  {comp:<14} {n:>14,d} params")
    print(f"  {'total':<14} {sum(counts.values()):>14,d} params; read {t1 - t0:.1f}s, write {t2 - t1:.1f}s")
    if f.push_to_hub:
        files = push_to_hub(out, f.push_to_hub, private=f.private or None, dry_run=f.dry_run)
        print(f"{'would upload' if f.dry_run else 'uploaded'} {len(files)} files to "
              f"https://huggingface.co/{f.push_to_hub}" + (" (dry run)" if f.dry_run else "") + ":")
        for name in files:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
