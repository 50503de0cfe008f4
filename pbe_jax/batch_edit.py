"""Batch editing over a manifest: the rows, their validation, and the loop that edits them in
batches of one size (used by `python -m pbe_jax.sample` and by evaluation).

A manifest is a .jsonl (rows `{"source", "mask", "reference"[, "id", "seed"]}`) or a .csv with
those columns; relative paths are relative to the manifest. A malformed manifest (a bad line, a
non-integer seed, repeated ids) fails at once, naming the file, line and field. Rows are grouped
by source size into batches; each output's noise comes from its own seed (row seed + k), so
results do not depend on the batching or the number of devices.

One row never stops the others: a bad row (missing file, unreadable or too large image, empty
mask, mask size differs from the source, an id that is not a plain file name, a source over
`max_pixels`) fails with its reason; a batch that fails on the device (e.g. out of memory) is
retried row by row, so only the rows that fail alone are marked failed. Each output is written
whole (a temporary name renamed into place) and a rerun redoes any that does not decode.
`settings.json` records the generation settings; a rerun with other settings is refused, naming
the differences, unless `overwrite`.
"""
from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import jax
import numpy as np

from pbe_jax.data.sources import csv_lines
from pbe_jax.inference import (AUTO, crop_inputs, finish, larger_than_model, load_edit_mask, load_rgb,
                               paste_windows, prepare, run_edit, to_uint8)
from pbe_jax.outputs import decodes, write_json, write_png

SETTINGS_FILE = "settings.json"


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


def _records(path: str) -> list[tuple[int, object]]:
    """(line number, record) of a .csv (dicts keyed by the header) or .jsonl manifest."""
    if path.endswith(".csv"):
        lines = csv_lines(path)
        _, header = next(lines, (0, None))
        records = []
        for n, fields in lines:
            if fields is None or header is None or len(fields) != len(header):
                got = "an unparseable line" if fields is None else f"{len(fields)} fields"
                raise ValueError(f"{path}:{n}: malformed CSV row ({got}; the header has "
                                 f"{len(header or [])}: {header})")
            records.append((n, dict(zip(header, fields))))
        return records
    if path.endswith((".jsonl", ".json")):
        records = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        return records
    raise ValueError(f"{path}: manifest must be .jsonl or .csv")


def _seed(value, where: str) -> int:
    """A manifest seed: an integer, or its decimal text (CSV)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: field 'seed' is {value!r}, not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: field 'seed' is {value!r}, not an integer") from None


def read_manifest(path: str, base_seed: int) -> list[Row]:
    """Rows of a .jsonl or .csv manifest; raises ValueError naming the file and line (and the
    field) of a malformed row, and the ids that repeat."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for i, (line, r) in enumerate(_records(path)):
        where = f"{path}:{line}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: a row is an object with source, mask, reference, got {r!r}")
        missing = [k for k in ("source", "mask", "reference") if not r.get(k)]
        if missing:
            raise ValueError(f"{where}: row {i} lacks {missing}")
        absp = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
        seed = r.get("seed")
        rows.append(Row(id=str(r.get("id") or f"{i:06d}"), source=absp(r["source"]), mask=absp(r["mask"]),
                        reference=absp(r["reference"]),
                        seed=_seed(seed, where) if seed not in (None, "") else base_seed + 1000 * i))
    repeated = [k for k, n in collections.Counter(r.id for r in rows).items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: duplicate ids {repeated[:20]}" + (f" (+{len(repeated) - 20} more)"
                         if len(repeated) > 20 else "") + ": each id names its output files")
    return rows


def output_path(out_dir: str, row_id: str, k: int) -> str:
    """`<out_dir>/<row_id>_<k>.png`: the one place a row's k-th output name is made. An id that
    is not a plain file name (a path separator, so also `../x` and absolute paths; a NUL; over
    200 bytes) would write outside `out_dir` or fail there: ValueError naming the row."""
    bad = (not row_id or "\x00" in row_id or len(row_id.encode()) > 200
           or any(sep and sep in row_id for sep in ("/", "\\", os.sep, os.altsep)))
    path = os.path.join(out_dir, f"{row_id}_{k}.png")
    if bad or os.path.dirname(os.path.abspath(path)) != os.path.abspath(out_dir):
        raise ValueError(f"row id {row_id!r} is not a plain file name (no '/', '\\', NUL; at most "
                         f"200 bytes): its output would not be a file in {out_dir}")
    return path


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


def _edit_batch(pipe, chunk: list[Row], *, num_samples: int, reference_preprocess: str, max_pixels,
                steps: int, guidance: float, scheduler: str, paste_back: bool, mesh,
                crop_padding: int | None = None) -> list[np.ndarray]:
    """[uint8 [H, W, 3]] * (len(chunk) * num_samples) for rows of one source size, or, with
    `crop_padding`, rows of any size edited in a window around their mask (`crop_inputs`) at the
    model's resolution and pasted back into the full source."""
    seeds = [r.seed + k for r in chunk for k in range(num_samples)]
    images, edits = [r.image for r in chunk], [r.edit for r in chunk]
    work_images, work_edits = images, edits
    if crop_padding is not None:
        windows, work_images, work_edits = crop_inputs(pipe, images, edits, crop_padding)
    inputs = prepare(pipe, work_images, work_edits, [r.ref for r in chunk], seeds,
                     num_images_per_prompt=num_samples, reference_preprocess=reference_preprocess,
                     max_pixels=max_pixels)
    out = run_edit(pipe, inputs, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                   mesh=mesh)
    out = finish(out, work_images, work_edits, num_images_per_prompt=num_samples,
                 paste_back=paste_back and crop_padding is None)
    if crop_padding is not None:
        out = paste_windows(out, images, edits, windows, num_images_per_prompt=num_samples)
    return [to_uint8(o) for o in out]


def _reason(e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 600 else msg[:600] + " ..."  # XLA's out-of-memory reports run long


def _rows_alone(pipe, chunk: list[Row], error: Exception, failed: dict[str, str], log, kw) -> list:
    """A batch raised `error`: edit its rows one at a time, so one bad row does not fail its
    batch-mates; the rows that fail alone go to `failed`. Returns [([row], outputs)]."""
    if log is not None and len(chunk) > 1:
        log.warning("a batch of %d rows failed (%s); retrying them one at a time", len(chunk),
                    _reason(error))
    parts = []
    for r in chunk:
        e = error
        if len(chunk) > 1:
            try:
                parts.append(([r], _edit_batch(pipe, [r], **kw)))
                continue
            except Exception as again:  # noqa: BLE001
                e = again
        failed[r.id] = _reason(e)
        if log is not None:
            log.warning("row %s failed: %s", r.id, failed[r.id])
    return parts


def edit_rows(pipe, rows: list[Row], *, batch_size: int, steps: int, guidance: float, scheduler: str,
              num_samples: int = 1, paste_back: bool = False, reference_preprocess: str = "squash",
              mask_crop_padding: int | None = None, mesh: jax.sharding.Mesh | None = None,
              max_pixels: int | str | None = AUTO, failed: dict[str, str] | None = None,
              log=None) -> Iterator[tuple[Row, list[np.ndarray]]]:
    """Edit validated `rows` in batches of one source size: yields (row, [uint8 [H, W, 3] per
    sample]) as each batch finishes, on every process. `batch_size` counts output images.
    With `mask_crop_padding`, rows larger than the model's resolution are edited in a window
    around their mask (`inference.crop_inputs`), so they batch together whatever their size.

    With `failed`, a batch that raises (a source over `max_pixels`, out of device memory, ...)
    is retried one row at a time, and the rows that fail alone go to `failed` ({row id:
    reason}) instead of stopping the run; without it, the error propagates."""
    by_size: dict[tuple, list[Row]] = {}
    for r in rows:
        crop = mask_crop_padding is not None and larger_than_model(pipe, r.image.shape[:2])
        by_size.setdefault(("crop",) if crop else r.image.shape[:2], []).append(r)
    rows_per_batch = max(1, batch_size // num_samples)
    for key, group in by_size.items():
        kw = dict(num_samples=num_samples, reference_preprocess=reference_preprocess, max_pixels=max_pixels,
                  steps=steps, guidance=guidance, scheduler=scheduler, paste_back=paste_back, mesh=mesh,
                  crop_padding=mask_crop_padding if key == ("crop",) else None)
        for i in range(0, len(group), rows_per_batch):
            chunk = group[i:i + rows_per_batch]
            try:
                parts = [(chunk, _edit_batch(pipe, chunk, **kw))]
            except Exception as e:  # noqa: BLE001 (XLA, PIL and our checks raise many types)
                if failed is None:
                    raise
                parts = _rows_alone(pipe, chunk, e, failed, log, kw)
            for done, out in parts:
                for j, r in enumerate(done):
                    yield r, list(out[j * num_samples:(j + 1) * num_samples])


def check_settings(out_dir: str, settings: dict, *, overwrite: bool = False,
                   remedy: str = "use another --out, or --overwrite to redo every row with the new "
                                 "settings") -> None:
    """Refuse to add to `out_dir` results made with other generation settings: ValueError
    naming each difference (old -> new) and the `remedy`, unless `overwrite` (then every row is
    redone). Call it before loading a model."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); {remedy}") from None
    # A key the file lacks was written before that setting existed: the run had its default.
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v and (k in old or v)}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{out_dir} holds results made with other settings ({changes}); {remedy}")


def write_settings(out_dir: str, settings: dict) -> None:
    """Record the generation settings of `out_dir` (process 0), before its first result."""
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, SETTINGS_FILE), settings)


def write_results(pipe, rows: list[Row], out_dir: str, *, batch_size: int, steps: int, guidance: float,
                  scheduler: str, num_samples: int, paste_back: bool, reference_preprocess: str,
                  mask_crop_padding: int | None = None, mesh=None, log=None,
                  max_pixels: int | str | None = AUTO, overwrite: bool = False) -> tuple[int, dict[str, str]]:
    """Edit every row whose outputs `<out_dir>/<id>_<k>.png` (`output_path`) are not there or do
    not decode (every row with `overwrite`); process 0 writes each whole. Returns (images
    written, {row id: failure reason}); a failing row never stops the others."""
    from tqdm import tqdm  # noqa: PLC0415 (progress bar only)

    os.makedirs(out_dir, exist_ok=True)
    failed: dict[str, str] = {}
    todo = []
    for r in rows:
        try:
            r.outputs = [output_path(out_dir, r.id, k) for k in range(num_samples)]
        except ValueError as e:
            reason = str(e)
        else:
            if not overwrite and all(decodes(p) for p in r.outputs):
                continue  # done; a cut or unreadable file is made again
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
                                 mask_crop_padding=mask_crop_padding, mesh=mesh,
                                 max_pixels=max_pixels, failed=failed, log=log):
        if jax.process_index() == 0:
            for img, p in zip(images, row.outputs):
                write_png(p, img)
        written += len(images)
        bar.update(len(images))
        bar.set_postfix(img_per_s=f"{written / (time.perf_counter() - t0):.2f}")
    bar.close()
    return written, failed
