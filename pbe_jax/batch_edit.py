"""Batch editing over a manifest: the rows, their validation, and the loop that edits them in
batches of one size (used by `python -m pbe_jax.sample` and by evaluation).

A manifest is a .jsonl (rows `{"source", "mask", "reference"[, "id", "seed"]}`) or a .csv with
those columns; relative paths are relative to the manifest. A bad row (missing file, unreadable
image, empty mask, mask size differs from the source) is reported with its reason and the rest
go on. Rows are grouped by source size into batches; each output's noise comes from its own seed
(row seed + k), so results do not depend on the batching or the number of devices.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import jax
import numpy as np
from PIL import Image

from pbe_jax.inference import (crop_inputs, finish, larger_than_model, load_edit_mask, load_rgb, paste_windows,
                               prepare, run_edit, to_uint8)


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


def edit_rows(pipe, rows: list[Row], *, batch_size: int, steps: int, guidance: float, scheduler: str,
              num_samples: int = 1, paste_back: bool = False, reference_preprocess: str = "squash",
              mask_crop_padding: int | None = None, mesh: jax.sharding.Mesh | None = None
              ) -> Iterator[tuple[Row, list[np.ndarray]]]:
    """Edit validated `rows` in batches of one source size: yields (row, [uint8 [H, W, 3] per
    sample]) as each batch finishes, on every process. `batch_size` counts output images.
    With `mask_crop_padding`, rows larger than the model's resolution are edited in a window
    around their mask (`inference.crop_inputs`), so they batch together whatever their size."""
    by_size: dict[tuple, list[Row]] = {}
    for r in rows:
        crop = mask_crop_padding is not None and larger_than_model(pipe, r.image.shape[:2])
        by_size.setdefault(("crop",) if crop else r.image.shape[:2], []).append(r)
    rows_per_batch = max(1, batch_size // num_samples)
    for key, group in by_size.items():
        for i in range(0, len(group), rows_per_batch):
            chunk = group[i:i + rows_per_batch]
            seeds = [r.seed + k for r in chunk for k in range(num_samples)]
            images, edits = [r.image for r in chunk], [r.edit for r in chunk]
            work_images, work_edits = images, edits
            if key == ("crop",):
                windows, work_images, work_edits = crop_inputs(pipe, images, edits, mask_crop_padding)
            inputs = prepare(pipe, work_images, work_edits, [r.ref for r in chunk], seeds,
                             num_images_per_prompt=num_samples, reference_preprocess=reference_preprocess)
            out = run_edit(pipe, inputs, num_inference_steps=steps, guidance_scale=guidance,
                           scheduler=scheduler, mesh=mesh)
            out = finish(out, work_images, work_edits, num_images_per_prompt=num_samples,
                         paste_back=paste_back and key != ("crop",))
            if key == ("crop",):
                out = paste_windows(out, images, edits, windows, num_images_per_prompt=num_samples)
            out = [to_uint8(o) for o in out]
            for j, r in enumerate(chunk):
                yield r, list(out[j * num_samples:(j + 1) * num_samples])


def write_results(pipe, rows: list[Row], out_dir: str, *, batch_size: int, steps: int, guidance: float,
                  scheduler: str, num_samples: int, paste_back: bool, reference_preprocess: str,
                  mask_crop_padding: int | None = None, mesh=None, log=None) -> tuple[int, dict[str, str]]:
    """Edit every row whose outputs `<out_dir>/<id>_<k>.png` are not there yet; process 0 writes.
    Returns (images written, {row id: failure reason})."""
    from tqdm import tqdm  # noqa: PLC0415 (progress bar only)

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
            if log is not None:
                log.warning("row %s skipped: %s", r.id, reason)
        else:
            todo.append(r)
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo) * num_samples, unit="img", disable=jax.process_index() != 0)
    for row, images in edit_rows(pipe, todo, batch_size=batch_size, steps=steps, guidance=guidance,
                                 scheduler=scheduler, num_samples=num_samples, paste_back=paste_back,
                                 reference_preprocess=reference_preprocess,
                                 mask_crop_padding=mask_crop_padding, mesh=mesh):
        if jax.process_index() == 0:
            for img, p in zip(images, row.outputs):
                Image.fromarray(img).save(p)
        written += len(images)
        bar.update(len(images))
        bar.set_postfix(img_per_s=f"{written / (time.perf_counter() - t0):.2f}")
    bar.close()
    return written, failed
