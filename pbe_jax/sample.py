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
so results do not depend on the batching or the number of devices.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("pbe_jax")


@dataclass
class Row:
    id: str
    source: str
    mask: str
    reference: str
    seed: int
    image: np.ndarray | None = None
    edit: np.ndarray | None = None
    ref: np.ndarray | None = None
    outputs: list[str] = field(default_factory=list)


def read_manifest(path: str, base_seed: int) -> list[Row]:
    """Rows of a .jsonl or .csv manifest; raises ValueError naming the line of a malformed row."""
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    elif path.endswith((".jsonl", ".json")):
        records = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    else:
        raise ValueError(f"{path}: manifest must be .jsonl or .csv")
    rows = []
    for i, r in enumerate(records):
        missing = [k for k in ("source", "mask", "reference") if not r.get(k)]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
        absp = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
        seed = r.get("seed")
        rows.append(Row(id=str(r.get("id") or f"{i:06d}"), source=absp(r["source"]), mask=absp(r["mask"]),
                        reference=absp(r["reference"]),
                        seed=int(seed) if seed not in (None, "") else base_seed + 1000 * i))
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids")
    return rows


def validate(row: Row) -> str | None:
    """Load the row's images; the reason it is bad, or None."""
    from pbe_jax.inference import load_edit_mask, load_rgb  # noqa: PLC0415

    for what in ("source", "mask", "reference"):
        if not os.path.isfile(getattr(row, what)):
            return f"missing {what} file {getattr(row, what)}"
    try:
        row.image = load_rgb(row.source, "source")
        row.edit = load_edit_mask(row.mask, "mask")
        row.ref = load_rgb(row.reference, "reference")
    except ValueError as e:
        return f"unreadable image: {e}"
    if row.edit.shape != row.image.shape[:2]:
        return (f"mask size {row.edit.shape[1]}x{row.edit.shape[0]} differs from source size "
                f"{row.image.shape[1]}x{row.image.shape[0]}")
    if not row.edit.any():
        return "empty mask (no white pixels)"
    return None


def run(pipe, rows: list[Row], out_dir: str, *, batch_size: int, steps: int, guidance: float,
        scheduler: str, num_samples: int, paste_back: bool, reference_preprocess: str,
        mesh=None) -> tuple[int, dict[str, str]]:
    """Edit every row not done yet. Returns (images written, {row id: failure reason})."""
    from tqdm import tqdm  # noqa: PLC0415

    from pbe_jax.inference import edit  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    failed: dict[str, str] = {}
    todo = []
    for r in rows:
        r.outputs = [os.path.join(out_dir, f"{r.id}_{k}.png") for k in range(num_samples)]
        if all(os.path.exists(p) for p in r.outputs):
            continue
        reason = validate(r)
        if reason:
            failed[r.id] = reason
            log.warning("row %s skipped: %s", r.id, reason)
        else:
            todo.append(r)
    by_size: dict[tuple, list[Row]] = {}
    for r in todo:
        by_size.setdefault(r.image.shape[:2], []).append(r)
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo) * num_samples, unit="img", disable=jax.process_index() != 0)
    rows_per_batch = max(1, batch_size // num_samples)
    for group in by_size.values():
        for i in range(0, len(group), rows_per_batch):
            chunk = group[i:i + rows_per_batch]
            seeds = [r.seed + k for r in chunk for k in range(num_samples)]
            images = edit(pipe, [r.image for r in chunk], [r.edit for r in chunk],
                          [r.ref for r in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          scheduler=scheduler, seed=seeds, num_images_per_prompt=num_samples,
                          paste_back=paste_back, reference_preprocess=reference_preprocess, mesh=mesh)
            if jax.process_index() == 0:
                paths = [p for r in chunk for p in r.outputs]
                for img, p in zip(images, paths):
                    img.save(p)
            written += len(images)
            bar.update(len(images))
            bar.set_postfix(img_per_s=f"{written / (time.perf_counter() - t0):.2f}")
    bar.close()
    return written, failed


def _settings(flags_) -> dict:
    keys = ("model", "steps", "guidance", "scheduler", "seed", "num_samples", "paste_back",
            "reference_preprocess", "batch_size", "dtype")
    return {k: getattr(flags_, k) for k in keys}


def main(argv) -> int:
    from absl import flags  # noqa: PLC0415

    from pbe_jax import distributed  # noqa: PLC0415
    from pbe_jax.models.hub import cast_dtype  # noqa: PLC0415
    from pbe_jax.pipeline import PaintByExample  # noqa: PLC0415
    from pbe_jax.train import setup_logging  # noqa: PLC0415

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
    mesh = None
    if jax.device_count() > 1:
        from pbe_jax.sharding import make_mesh  # noqa: PLC0415

        mesh = make_mesh("data:-1")
    kw = dict(batch_size=F.batch_size, steps=F.steps, guidance=F.guidance, scheduler=F.scheduler,
              num_samples=F.num_samples, paste_back=F.paste_back,
              reference_preprocess=F.reference_preprocess, mesh=mesh)
    if single:
        out_dir = os.path.dirname(os.path.abspath(F.out))
        stem = os.path.splitext(os.path.basename(F.out))[0]
        row = Row(id=stem, source=F.source, mask=F.mask, reference=F.reference, seed=F.seed)
        _, failed = run(pipe, [row], out_dir, **{**kw, "num_samples": 1})
        if not failed and jax.process_index() == 0:
            os.replace(os.path.join(out_dir, f"{stem}_0.png"), F.out)
        rows = [row]
    else:
        rows = read_manifest(F.manifest, F.seed)
        _, failed = run(pipe, rows, F.out, **kw)
        if jax.process_index() == 0:
            with open(os.path.join(F.out, "settings.json"), "w") as f:
                json.dump(_settings(F), f, indent=2)
    done = len(rows) - len(failed)
    print(f"summary: {done}/{len(rows)} rows done, {len(failed)} failed")
    for rid, reason in failed.items():
        print(f"  failed {rid}: {reason}")
    return 1 if failed else 0


def define_flags() -> None:
    from absl import flags  # noqa: PLC0415

    from pbe_jax import distributed  # noqa: PLC0415

    flags.DEFINE_string("model", None, "diffusers PbE repo (dir or hub id) or a pbe_jax workdir/checkpoint")
    flags.DEFINE_string("manifest", None, ".jsonl or .csv with source, mask, reference[, id, seed]")
    flags.DEFINE_string("out", None, "output directory (manifest) or file (single edit)")
    flags.DEFINE_string("source", None, "single edit: source image")
    flags.DEFINE_string("mask", None, "single edit: mask (white = edit)")
    flags.DEFINE_string("reference", None, "single edit: reference image")
    flags.DEFINE_integer("batch_size", 4, "images per device batch (all devices together)")
    flags.DEFINE_integer("steps", 50, "denoising steps")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale (1 = off)")
    flags.DEFINE_enum("scheduler", "plms", ["plms", "pndm", "ddim", "dpm++2m", "euler"], "sampler")
    flags.DEFINE_integer("seed", 0, "base seed (rows without a seed use seed + 1000 * row)")
    flags.DEFINE_integer("num_samples", 1, "outputs per row")
    flags.DEFINE_bool("paste_back", False, "blend the source back outside a feathered mask")
    flags.DEFINE_enum("reference_preprocess", "squash", ["squash", "center_crop"], "reference resize")
    flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "compute dtype")
    flags.mark_flags_as_required(["model", "out"])
    distributed.define_flags()


def training_samples(model, batch: dict, config) -> np.ndarray | None:
    """A grid (rows: masked source, reference, sample, VAE reconstruction of the source) of
    `config.sample_num` edits of the current
    training batch with the model being trained; run by every process, returned on each."""
    from pbe_jax.inference import resolve_scheduler  # noqa: PLC0415

    n = min(int(config.sample_num), batch["image"].shape[0])
    if n <= 0:
        return None
    sched = resolve_scheduler(model, "plms", int(config.sample_steps))
    rep = jax.sharding.NamedSharding(jax.tree.leaves(batch)[0].sharding.mesh, jax.sharding.PartitionSpec())
    out = _training_samples_core(model, batch, n, sched, float(config.sample_guidance), rep)
    return np.asarray(out.addressable_data(0))


def _training_samples_core(model, batch, n, sched, guidance, rep):
    from flax import nnx  # noqa: PLC0415

    from pbe_jax.data.batch import normalize_batch  # noqa: PLC0415
    from pbe_jax.inference import _edit_core  # noqa: PLC0415

    graphdef, state = nnx.split(model)

    def f(state, batch):
        b = normalize_batch({k: v[:n] for k, v in batch.items()})
        keep = (b["mask"] >= 0.5).astype(jnp.float32)
        seeds = jnp.arange(n, dtype=jnp.uint32)
        out = _edit_core(graphdef, state, b["image"], keep, b["reference"], seeds, None,
                                     jnp.float32(guidance), scheduler=sched, cfg=guidance != 1.0,
                                     masked_latents="mode", batch_sharding=None)
        masked = (b["masked_image"] + 1) / 2
        h = out.shape[1]
        ref = batch["reference"][:n].astype(jnp.float32) / 255.0
        ref = jax.image.resize(ref, (n, h, h, 3), "linear")
        # What the frozen VAE makes of the source: the best a sample can look (with the demo's
        # random VAE this is itself noise-like, and samples should match it outside the hole).
        vae = nnx.merge(graphdef, state).vae
        recon = jnp.clip(vae.decode(vae.encode(b["image"]).mode()) / 2 + 0.5, 0.0, 1.0)
        rows = (masked, ref, out, recon)
        return jnp.concatenate([jnp.concatenate(list(x), axis=1) for x in rows], axis=0)

    return jax.jit(f, out_shardings=rep)(state, batch)



if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
