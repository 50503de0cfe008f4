"""The COCOEE benchmark on disk: its triplets, results made by any tool, the FID reference set.

Layout of the authors' `test_bench/` (README; `ldm/data/test_bench_dataset.py`, commit 0c34124):

    id_list.npy                     3500 COCO ids (int), the benchmark order
    GT_3500/{id:012d}_GT.png        source images (512 x 512)
    Ref_3500/{id:012d}_ref.png      exemplars (the official loaders use the 12-digit id)
    Mask_bbox_3500/{id:012d}_mask.png  box masks, white (255) = region to edit

Without `id_list.npy` the ids are the GT file names. Any manifest that `pbe_jax.sample` reads
(.jsonl / .csv with source, mask, reference[, id, seed]) works as a bench too.

Result files are matched to bench ids by name (`match_results`), so results written by other
tools (the official `scripts/inference_test_bench.py` writes `results/{id:012d}.png`) score
side by side with ours (`pbe_jax.sample` writes `{id}_{k}.png`).
"""
from __future__ import annotations

import os
import re

import numpy as np

from pbe_jax.batch_edit import Row, read_manifest
from pbe_jax.evals.fid import FID_REF_SIZE, fid_reference_image
from pbe_jax.evals.images import IMAGE_EXTENSIONS, list_images
from pbe_jax.outputs import decodes, write_png

GT_DIR, REF_DIR, MASK_DIR = "GT_3500", "Ref_3500", "Mask_bbox_3500"
# Result names: `<id>.<ext>`, `<id>_<k>.<ext>` (sample k) and `<id>_<tag>.<ext>` for these tags
# (e.g. scoring the GT_3500 sources themselves as a reference point).
RESULT_TAGS = ("GT", "result", "output", "out", "pred", "sample")
_RESULT_NAME = re.compile(r"^(?P<id>.+?)(?:_(?P<suffix>\d+|" + "|".join(RESULT_TAGS) + r"))?$")


def _row_seed(base_seed: int, index: int) -> int:
    return base_seed + 1000 * index  # pbe_jax.sample.read_manifest's rule for rows without a seed


def _first_existing(directory: str, names: list[str]) -> str:
    for n in names:
        p = os.path.join(directory, n)
        if os.path.isfile(p):
            return p
    return os.path.join(directory, names[0])  # reported as missing by pbe_jax.sample.validate


def _bench_root(bench: str) -> str:
    """The folder holding GT_3500/ (the bench itself or its `test_bench/` subfolder)."""
    for root in (bench, os.path.join(bench, "test_bench")):
        if os.path.isdir(os.path.join(root, GT_DIR)):
            return root
    raise FileNotFoundError(f"{bench}: not a COCOEE test bench (no {GT_DIR}/ in it or in "
                            f"{os.path.join(bench, 'test_bench')}); give the folder with {GT_DIR}/, "
                            f"{REF_DIR}/, {MASK_DIR}/ or a .jsonl/.csv manifest")


def bench_ids(root: str) -> list[str]:
    """The bench's ids as strings: 12-digit zero-padded from `id_list.npy` (its order), else the
    `<id>` of `GT_3500/<id>_GT.png` file names (sorted)."""
    for p in (os.path.join(root, "id_list.npy"), os.path.join(os.path.dirname(root), "id_list.npy")):
        if os.path.isfile(p):
            ids = np.load(p, allow_pickle=False).ravel().tolist()
            return [str(int(i)).zfill(12) for i in ids]
    gt = os.path.join(root, GT_DIR)
    ids = sorted(f[:-len("_GT.png")] for f in os.listdir(gt) if f.endswith("_GT.png"))
    if not ids:
        raise FileNotFoundError(f"{gt}: no <id>_GT.png files and no id_list.npy in {root}")
    return ids


def read_bench(bench: str, *, seed: int = 0, limit: int | None = None) -> list[Row]:
    """The first `limit` (all when None / 0) triplets of a COCOEE folder or a manifest, as
    `pbe_jax.sample.Row`s; row i's seed is `seed + 1000 i` unless the manifest gives one."""
    if not os.path.exists(bench):
        raise FileNotFoundError(f"--bench {bench}: no such file or directory")
    if os.path.isfile(bench):
        rows = read_manifest(bench, seed)
    else:
        root = _bench_root(bench)
        rows = []
        for i, rid in enumerate(bench_ids(root)):
            short = str(int(rid)) if rid.isdigit() else rid
            rows.append(Row(
                id=rid, source=os.path.join(root, GT_DIR, f"{rid}_GT.png"),
                # The official loaders use the 12-digit id; the short one is accepted too.
                reference=_first_existing(os.path.join(root, REF_DIR), [f"{rid}_ref.png", f"{short}_ref.png"]),
                mask=_first_existing(os.path.join(root, MASK_DIR), [f"{rid}_mask.png", f"{short}_mask.png"]),
                seed=_row_seed(seed, i)))
    if not rows:
        raise ValueError(f"--bench {bench}: no triplets")
    return rows[:limit] if limit else rows


def _id_key(rid: str) -> str:
    """Numeric ids compare as numbers (`1773` == `000000001773`)."""
    return str(int(rid)) if rid.isdigit() else rid


def match_results(results_dir: str, ids: list[str], *, sample_index: int = 0) -> dict[str, str]:
    """{bench id: result file} for the ids that have one in `results_dir`.

    Accepted names (any extension of `images.IMAGE_EXTENSIONS`): `<id>.png` (the official
    `inference_test_bench.py`), `<id>_<k>.png` (pbe_jax.sample; sample `sample_index` is taken)
    and `<id>_<tag>.png` with tag in `RESULT_TAGS` (`_GT` lets GT_3500 itself be scored). Ids
    match numerically when both are digits, so `1773.png` matches `000000001773`. Two files
    for one id (e.g. `<id>.png` and `<id>_GT.png`) raise ValueError naming both.
    """
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"--results {results_dir}: not a directory")
    wanted = {_id_key(r): r for r in ids}
    found: dict[str, str] = {}
    for f in sorted(os.listdir(results_dir)):
        stem, _, ext = f.rpartition(".")
        if ext.lower() not in IMAGE_EXTENSIONS or not stem:
            continue
        m = _RESULT_NAME.match(stem)
        rid, suffix = m.group("id"), m.group("suffix")
        if _id_key(rid) not in wanted and _id_key(stem) in wanted:
            rid, suffix = stem, None  # an id that itself ends in _<digits> or _<tag>
        if suffix is not None and suffix.isdigit() and int(suffix) != sample_index:
            continue
        key = _id_key(rid)
        if key not in wanted:
            continue
        bench_id = wanted[key]
        path = os.path.join(results_dir, f)
        if bench_id in found:
            raise ValueError(f"{results_dir}: two results for id {bench_id}: {os.path.basename(found[bench_id])} "
                             f"and {f}; keep one")
        found[bench_id] = path
    return found


def prepare_fid_reference(src_dir: str, out_dir: str, size: int = FID_REF_SIZE) -> int:
    """Write `fid_reference_image` of every image of `src_dir` to `out_dir/<stem>.png` (existing
    files that decode are kept, so a rerun resumes). Returns the number of files written."""

    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for p in list_images(src_dir):
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + ".png")
        if not decodes(dst):
            write_png(dst, fid_reference_image(p, size))
            written += 1
    return written
