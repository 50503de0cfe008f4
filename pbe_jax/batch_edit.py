"""Batch editing over a manifest: the rows, their validation, and the loop that edits them in
batches of one size (used by `python -m pbe_jax.sample` and by evaluation).

A manifest is a .jsonl (rows `{"source", "mask", "reference"[, "id", "seed"]}`) or a .csv with
those columns; relative paths are relative to the manifest. A malformed manifest (a bad line, a
non-integer seed, repeated ids) fails at once, naming the file, line and field. Rows are grouped
by source size into batches; each output's noise comes from its own seed (row seed + k), so
results do not depend on the batching or the number of devices.

One row never stops the others: a bad row (missing file, unreadable image, an input over
`max_source_pixels` (read from the file header, before any pixel is decoded), empty mask, mask
size differs from the source, an id that is not a plain file name, a source over `max_pixels`,
an output that would replace an input of the manifest or a file pbe_jax did not write) fails
with its reason; a batch that fails on the device (e.g. out of memory) is retried row by row, so
only the rows that fail alone are marked failed.

Memory does not grow with the manifest: rows are checked from their file headers first, and
their pixels are decoded batch by batch as they are edited (the next batch is decoded in a
thread while the current one runs), then dropped.

Each output is written whole (a temporary name renamed into place) and carries a PNG text chunk
`pbe_jax` naming its row, sample and a digest of the settings that made it; a rerun counts as
done only outputs that decode and carry this run's tag, so an unrelated file, or an input, is
never taken for a result. `settings.json` records the generation settings (and which weights
made the outputs); it is written before the first output, so a run where every row failed
leaves none; a rerun with other settings is refused, naming the differences, unless `overwrite`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import jax
import numpy as np
from PIL import Image, PngImagePlugin

from pbe_jax.data.decode import SWAPS_SIDES, exif_orientation
from pbe_jax.data.sources import csv_lines
from pbe_jax.inference import (AUTO, crop_inputs, finish, larger_than_model, load_edit_mask, load_rgb,
                               paste_windows, prepare, run_edit, to_uint8)
from pbe_jax.outputs import atomic_write, decodes, write_json

SETTINGS_FILE = "settings.json"
# The largest input (source, mask or reference) decoded, in pixels, unless told otherwise:
# 8192 x 8192, 192 MiB as RGB uint8 (PIL and the conversions hold a few copies while decoding).
# Checked from the file header, so a 144-megapixel PNG of 450 KB is refused before it takes GBs.
MAX_SOURCE_PIXELS = 8192 * 8192
OUTPUT_TAG = "pbe_jax"  # the PNG text chunk that says which row, sample and settings made a file
INPUTS = ("source", "mask", "reference")


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
    size: tuple[int, int] | None = None  # (H, W) of the source as displayed, from its header


def _records(path: str) -> list[tuple[int, object]]:
    """(line number, record) of a .csv (dicts keyed by the header) or .jsonl manifest."""
    if path.endswith(".csv"):
        lines = csv_lines(path)
        _, header = next(lines, (0, None))
        if header:  # Excel's "CSV UTF-8" starts with a byte-order mark
            header = [header[0].removeprefix("\ufeff")] + header[1:]
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
        with open(path, encoding="utf-8-sig") as f:
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


def image_size(path: str, what: str, max_source_pixels: int | None = MAX_SOURCE_PIXELS) -> tuple[int, int]:
    """(H, W) of an image file as displayed (EXIF orientation applied), read from its header
    without decoding a pixel; ValueError naming the file when it is unreadable or over
    `max_source_pixels` (None or 0: no limit)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if exif_orientation(im) in SWAPS_SIDES:
                w, h = h, w
    except Image.DecompressionBombError as e:  # PIL's own limit (not an OSError)
        raise ValueError(f"{what} {path} is too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"unreadable image: {what}: cannot read image {path!r} ({e})") from None
    if max_source_pixels and w * h > max_source_pixels:
        raise ValueError(
            f"{what} {path} is {w}x{h} = {w * h:,} px, over the input size limit max_source_pixels="
            f"{max_source_pixels:,} (decoding it would take {3 * w * h / 2 ** 20:,.0f} MiB or more): "
            "downscale it, or raise --max_source_pixels")
    return h, w


def check_inputs(row: Row, max_source_pixels: int | None = MAX_SOURCE_PIXELS) -> str | None:
    """Check the row's files from their headers only (nothing decoded) and set `row.size`;
    the reason it is bad, or None."""
    sizes = {}
    for what in INPUTS:
        path = getattr(row, what)
        if not os.path.isfile(path):
            return f"missing {what} file {path}"
        try:
            sizes[what] = image_size(path, what, max_source_pixels)
        except ValueError as e:
            return str(e)
    (h, w), (mh, mw) = sizes["source"], sizes["mask"]
    if (mh, mw) != (h, w):
        return f"mask size {mw}x{mh} differs from source size {w}x{h}"
    row.size = (h, w)
    return None


def load_pixels(row: Row) -> str | None:
    """Decode the row's images into `row.image` / `edit` / `ref`; the reason it is bad, or None."""
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


def drop_pixels(row: Row) -> None:
    row.image = row.edit = row.ref = None


def validate(row: Row, max_source_pixels: int | None = MAX_SOURCE_PIXELS) -> str | None:
    """Check the row's files (headers first, then pixels) and load its images; the reason it is
    bad, or None."""
    return check_inputs(row, max_source_pixels) or load_pixels(row)


# ---------------------------------------------------------------------------------------------
# Which files are this run's outputs
# ---------------------------------------------------------------------------------------------


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_tag(row_id: str, k: int, digest: str) -> dict:
    """What an output carries in its PNG text chunk `pbe_jax`."""
    return {"id": row_id, "k": k, "settings": digest}


def read_tag(path: str) -> dict | None:
    """The `pbe_jax` tag of an image file (read from the chunks before the pixels), or None
    (no such file, not a PNG, not written by pbe_jax)."""
    try:
        with Image.open(path) as im:
            tag = json.loads(im.info.get(OUTPUT_TAG, "null"))
    except Exception:  # noqa: BLE001 (PIL raises many types on foreign files)
        return None
    return tag if isinstance(tag, dict) and "settings" in tag else None


def write_output(path: str, image: np.ndarray, tag: dict) -> None:
    """uint8 `[H, W, 3]` as a PNG carrying `tag`, written whole (`atomic_write`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(OUTPUT_TAG, json.dumps(tag, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG", pnginfo=info)
    atomic_write(path, buf.getvalue())


def input_files(rows: list[Row]) -> dict[str, tuple[str, str]]:
    """{real path: (row id, 'source' | 'mask' | 'reference')} of every input of `rows`."""
    return {os.path.realpath(getattr(r, what)): (r.id, what) for r in rows for what in INPUTS}


def output_conflict(path: str, inputs: dict[str, tuple[str, str]]) -> str | None:
    """Why `path` may not be written (it is an input), or None."""
    hit = inputs.get(os.path.realpath(path))
    if hit is None:
        return None
    return (f"its output {path} is the {hit[1]} file of row {hit[0]}: an output never replaces an "
            "input; use another --out (or another id)")


def foreign_file(path: str) -> str:
    return (f"{path} is already there and is not an output of this run (it has no pbe_jax tag: "
            "an unrelated file, or written by a pbe_jax older than this check); it is left alone: "
            "move it, use another --out, or --overwrite to replace it")


def _plan(r: Row, inputs, digest: str, overwrite: bool) -> tuple[bool, str | None]:
    """(done, reason it cannot be edited) for a row whose `outputs` are set."""
    for p in r.outputs:
        why = output_conflict(p, inputs)
        if why:
            return False, why
    if overwrite:
        return False, None
    tags = [read_tag(p) for p in r.outputs]
    if all(t == output_tag(r.id, k, digest) for k, t in enumerate(tags)) and all(map(decodes, r.outputs)):
        return True, None  # done; a cut one, or one made with other settings, is made again
    for p, t in zip(r.outputs, tags):
        if t is None and os.path.lexists(p):
            return False, foreign_file(p)
    return False, None


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


def _decode_chunk(chunk: list[Row]) -> tuple[list[Row], list[Row], dict[str, str]]:
    """(rows ready to edit, rows decoded here, {row id: reason}) of one batch: rows without
    pixels are decoded now."""
    ready, loaded, bad = [], [], {}
    for r in chunk:
        if r.image is not None:
            ready.append(r)
            continue
        reason = load_pixels(r)
        if reason:
            drop_pixels(r)
            bad[r.id] = reason
        else:
            ready.append(r)
            loaded.append(r)
    return ready, loaded, bad


def _size(r: Row) -> tuple[int, int]:
    if r.image is not None:
        return r.image.shape[:2]
    if r.size is None:
        reason = check_inputs(r, None)
        if reason:
            raise ValueError(f"row {r.id}: {reason}")
    return r.size


def edit_rows(pipe, rows: list[Row], *, batch_size: int, steps: int, guidance: float, scheduler: str,
              num_samples: int = 1, paste_back: bool = False, reference_preprocess: str = "squash",
              mask_crop_padding: int | None = None, mesh: jax.sharding.Mesh | None = None,
              max_pixels: int | str | None = AUTO, failed: dict[str, str] | None = None,
              log=None, prefetch: int = 1) -> Iterator[tuple[Row, list[np.ndarray]]]:
    """Edit `rows` in batches of one source size: yields (row, [uint8 [H, W, 3] per sample]) as
    each batch finishes, on every process. `batch_size` counts output images.
    With `mask_crop_padding`, rows larger than the model's resolution are edited in a window
    around their mask (`inference.crop_inputs`), so they batch together whatever their size.

    Rows come with their pixels (`validate`) or with only their size (`check_inputs`): those
    are decoded batch by batch, `prefetch` batches ahead in a thread, and dropped once yielded,
    so memory does not grow with the number of rows.

    With `failed`, a row that does not decode, or a batch that raises (a source over
    `max_pixels`, out of device memory, ...), does not stop the others: the batch is retried
    one row at a time, and the rows that fail alone go to `failed` ({row id: reason}) instead
    of stopping the run; without it, the error propagates."""
    by_size: dict[tuple, list[Row]] = {}
    for r in rows:
        size = _size(r)
        crop = mask_crop_padding is not None and larger_than_model(pipe, size)
        by_size.setdefault(("crop",) if crop else tuple(size), []).append(r)
    rows_per_batch = max(1, batch_size // num_samples)
    batches = iter([(key, group[i:i + rows_per_batch]) for key, group in by_size.items()
                    for i in range(0, len(group), rows_per_batch)])
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pbe_jax-decode") as pool:
        pending: collections.deque = collections.deque()

        def submit() -> bool:
            nxt = next(batches, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(_decode_chunk, nxt[1])))
            return nxt is not None

        submit()
        while pending:
            key, future = pending.popleft()
            chunk, loaded, bad = future.result()
            # the next `prefetch` batches are decoded while this one is on the device
            while len(pending) < prefetch and submit():
                pass
            for rid, reason in bad.items():
                if failed is None:
                    raise ValueError(f"row {rid}: {reason}")
                failed[rid] = reason
                if log is not None:
                    log.warning("row %s skipped: %s", rid, reason)
            if chunk:
                yield from _edit_chunk(pipe, chunk, failed, log, dict(
                    num_samples=num_samples, reference_preprocess=reference_preprocess,
                    max_pixels=max_pixels, steps=steps, guidance=guidance, scheduler=scheduler,
                    paste_back=paste_back, mesh=mesh,
                    crop_padding=mask_crop_padding if key == ("crop",) else None))
            for r in loaded:
                drop_pixels(r)
            if not pending:  # prefetch=0: the next batch is decoded only now
                submit()


def _edit_chunk(pipe, chunk: list[Row], failed, log, kw) -> Iterator[tuple[Row, list[np.ndarray]]]:
    num_samples = kw["num_samples"]
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


def loaded_weights(report, *, use_ema: bool | None = None) -> dict:
    """Which weights a `from_pretrained(..., return_report=True)` report says were loaded:
    {'checkpoint': the folder read, 'step': the training step (None: not a training run),
    'ema': bool}. `sample` / `evaluate` record it in settings.json (`check_weights`)."""
    name = os.path.basename(os.path.normpath(report.source))
    train = report.format == "orbax (train)" and name.isdigit()
    # which set was loaded: the report says (use_ema=None loads a run's EMA params when it has them)
    ema = bool(getattr(report, "ema", False)) if use_ema is None else bool(use_ema)
    return {"checkpoint": report.source, "step": int(name) if train else None, "ema": ema}


def _which(w: dict) -> str:
    if w.get("step") is None:
        return f"{w.get('checkpoint')}"
    return f"step {w['step']} ({'EMA' if w.get('ema') else 'raw'} params, {w.get('checkpoint')})"


def check_weights(out_dir: str, weights: dict, *, overwrite: bool = False) -> None:
    """Refuse to add outputs of other weights to `out_dir` (e.g. `--model=WORKDIR` resumed after
    training saved a newer step): ValueError naming both, unless `overwrite`. Call it once the
    model is loaded, before the first edit."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f).get("weights")
    except (OSError, ValueError, AttributeError):
        return  # check_settings has refused an unreadable file already
    if not old or (old.get("step"), old.get("ema")) == (weights.get("step"), weights.get("ema")):
        return
    raise ValueError(
        f"{out_dir} holds results made by {_which(old)}, but --model now loads {_which(weights)} "
        "(training has gone on since?): one output folder holds the results of one checkpoint; "
        "use another --out, or --overwrite to redo every row with the weights loaded now")


def write_results(pipe, rows: list[Row], out_dir: str, *, batch_size: int, steps: int, guidance: float,
                  scheduler: str, num_samples: int, paste_back: bool, reference_preprocess: str,
                  mask_crop_padding: int | None = None, mesh=None, log=None,
                  max_pixels: int | str | None = AUTO, max_source_pixels: int | None = MAX_SOURCE_PIXELS,
                  overwrite: bool = False, settings: dict | None = None) -> tuple[int, dict[str, str]]:
    """Edit every row whose outputs (`row.outputs`, else `<out_dir>/<id>_<k>.png` from
    `output_path`) are not this run's finished outputs (every row with `overwrite`); process 0
    writes each whole, tagged with the row, sample and a digest of `settings` (else of the edit
    arguments). With `settings`, `settings.json` is written just before the first output.
    Returns (images written, {row id: failure reason}); a failing row never stops the others.

    A row fails, untouched, when an output would replace an input (source, mask or reference)
    of any row, or, without `overwrite`, a file that is not a tagged pbe_jax output; its inputs
    are checked from their headers (`check_inputs`), its pixels decoded only when it is edited."""
    from tqdm import tqdm  # noqa: PLC0415 (progress bar only)

    os.makedirs(out_dir, exist_ok=True)
    edit_kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, num_samples=num_samples,
                   paste_back=paste_back, reference_preprocess=reference_preprocess,
                   mask_crop_padding=mask_crop_padding)
    digest = settings_digest(settings if settings is not None else edit_kw)
    inputs = input_files(rows)
    failed: dict[str, str] = {}
    todo = []
    for r in rows:
        try:
            r.outputs = r.outputs or [output_path(out_dir, r.id, k) for k in range(num_samples)]
        except ValueError as e:
            done, reason = False, str(e)
        else:
            done, reason = _plan(r, inputs, digest, overwrite)
            if not (done or reason):
                reason = check_inputs(r, max_source_pixels)
        if reason:
            failed[r.id] = reason
            if log is not None:
                log.warning("row %s skipped: %s", r.id, reason)
        elif not done:
            todo.append(r)
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo) * num_samples, unit="img", disable=jax.process_index() != 0)
    for row, images in edit_rows(pipe, todo, batch_size=batch_size, mesh=mesh, max_pixels=max_pixels,
                                 failed=failed, log=log, **edit_kw):
        if jax.process_index() == 0:
            if settings is not None and written == 0:
                write_settings(out_dir, settings)  # before the first output: it describes them
            for k, (img, p) in enumerate(zip(images, row.outputs)):
                write_output(p, img, output_tag(row.id, k, digest))
        written += len(images)
        bar.update(len(images))
        bar.set_postfix(img_per_s=f"{written / (time.perf_counter() - t0):.2f}")
    bar.close()
    return written, failed
