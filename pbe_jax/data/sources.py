"""Random-access sources of (image, boxes) records: COCO JSON, OpenImages CSV, TFDS, synthetic,
and a folder of your own images with a mask (or box) each.

Every source is a sequence (`len`, `[i]`) of `Record`s. Boxes are normalised (x0, y0, x1, y1)
in the displayed image (see decode.py for EXIF). The file-based sources apply the official box
filter once, when the index is built (scripts/read_bbox.py: normalised area in [0.02, 0.8];
images with no surviving box are left out), and count what they drop in `index_counts`; the
per-sample transform checks the boxes again against the decoded image size. A missing
annotation file or image folder fails here, at start, naming the config key; so does a field of
the wrong type (naming the file, the record and the field). CSV lines are parsed one by one
(`csv_lines`): a malformed line is one counted `malformed_row`, never the rest of the file.

The index is a few flat numpy arrays (not a list of dicts) because grain pickles the source
into every worker process.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from pbe_jax.data.decode import SWAPS_SIDES, exif_orientation
from pbe_jax.data.synthetic import draw_scene

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Record:
    """One image with its boxes. Exactly one of `path` (a file to read), `data` (encoded bytes)
    or `pixels` (`[H, W, 3]` uint8 RGB, already decoded) is set. `boxes` is `[N, 4]` float32
    normalised (x0, y0, x1, y1); `annotated_size` is the (W, H) the annotation gives, if any."""

    key: str
    boxes: np.ndarray
    path: str | None = None
    data: bytes | None = None
    pixels: np.ndarray | None = None
    annotated_size: tuple[int, int] | None = None
    mask_path: str | None = None  # an object mask file: its bounding box replaces `boxes`
    # `[H, W]` int16: the row of `boxes` whose object each pixel shows, -1 none (synthetic scenes)
    owner: np.ndarray | None = None


def clean_boxes(boxes: np.ndarray, min_area: float, max_area: float
                ) -> tuple[np.ndarray, collections.Counter]:
    """Normalised `[N, 4]` boxes -> the ones passing the official filter, clipped to [0, 1].

    Counts 'box_clipped' (partly outside the image) and 'box_degenerate' (non-finite, empty,
    inverted or entirely outside) with the same names as the per-sample counts."""
    counts = collections.Counter()
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    b = np.where(finite[:, None], b, 0.0)
    outside = ((b < -1e-6) | (b > 1 + 1e-6)).any(axis=1)
    c = np.clip(b, 0.0, 1.0)
    ok = finite & (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    counts["box_degenerate"] += int((~ok).sum())
    counts["box_clipped"] += int((ok & outside).sum())
    area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = ok & (area >= min_area) & (area <= max_area)
    return c[keep].astype(np.float32), counts


class BoxIndex:
    """Image files with their boxes, as flat arrays: record i is `paths[i]` (relative to
    `root`) with boxes `boxes[offsets[i]:offsets[i + 1]]` and annotated size `sizes[i]`
    ((0, 0) when unknown)."""

    def __init__(self, root: str, paths: list[str], boxes: list[np.ndarray],
                 sizes: list[tuple[int, int]], index_counts: collections.Counter, name: str):
        self.root = root
        # utf-8 bytes: a quarter of numpy's 4-byte unicode, and any file name round-trips.
        self.paths = (np.array([p.encode() for p in paths], dtype=np.bytes_) if paths
                      else np.zeros(0, "S1"))
        lengths = np.array([len(b) for b in boxes], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.boxes = (np.concatenate(boxes).astype(np.float32) if boxes
                      else np.zeros((0, 4), np.float32))
        self.sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
        self.index_counts = {k: int(v) for k, v in index_counts.items() if v}
        self.name = name
        if not len(self.paths):
            raise ValueError(f"{name}: no image with a valid box (counts: {self.index_counts})")
        log.info("%s: %d images, %d boxes; dropped at index time: %s", name, len(self.paths),
                 len(self.boxes), self.index_counts)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Record:
        rel = self.paths[i].decode("utf-8")
        w, h = (int(v) for v in self.sizes[i])
        return Record(key=rel, boxes=self.boxes[self.offsets[i]:self.offsets[i + 1]],
                      path=os.path.join(self.root, rel),
                      annotated_size=(w, h) if w > 0 and h > 0 else None)


def _require(path: str, key: str, kind: str) -> None:
    if not path:
        raise ValueError(f"config.data.{key} is empty; the source needs the {kind}")
    exists = os.path.isdir(path) if kind == "images folder" else os.path.isfile(path)
    if not exists:
        raise FileNotFoundError(f"config.data.{key}: {kind} {path!r} does not exist")


def csv_lines(path: str) -> Iterator[tuple[int, list[str] | None]]:
    """(line number, fields) of each non-blank line of a CSV file, header included; (n, None)
    for a malformed line. Each line is parsed on its own, so a stray `"` costs its own line
    (a whole-file `csv.reader` reads on to the next quote, swallowing thousands of rows into one
    field). Quoted fields may hold commas and quotes, not line breaks. Lines without a quote,
    nearly all of a big annotation file, are a plain split."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if '"' not in line:
                yield n, line.split(",")
                continue
            try:
                rows = list(csv.reader([line], strict=True))
            except csv.Error:
                rows = []
            yield n, rows[0] if len(rows) == 1 else None


def _field(record: Any, key: str, convert: Callable, kind: str, where: str):
    """`convert(record[key])`, None when the field is absent or null; a ValueError naming the
    file and record (`where`) and the field when the record is not an object or the value is
    not `kind`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: is {record!r}, not an object")
    value = record.get(key)
    if value is None:
        return None
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: field {key!r} is {value!r}, not {kind}") from None


def _box(v) -> list[float]:
    if isinstance(v, (str, bytes, dict)) or any(isinstance(x, (str, bool)) for x in v):
        raise TypeError(v)
    return [float(x) for x in v]


def coco_source(cfg) -> BoxIndex:
    """A COCO-format instances JSON (`images` with file_name/width/height, `annotations` with
    image_id and bbox [x, y, w, h] in pixels): COCO, LVIS, Objects365 and most tools' exports."""
    _require(cfg.annotations, "annotations", "annotation file")
    _require(cfg.images_dir, "images_dir", "images folder")
    with open(cfg.annotations) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config.data.annotations {cfg.annotations!r}: not JSON ({e})")
    for key in ("images", "annotations"):
        if key not in meta:
            raise ValueError(f"config.data.annotations {cfg.annotations!r}: no {key!r} list; "
                             "is it a COCO instances file?")
    counts = collections.Counter()
    by_image = collections.defaultdict(list)
    src = f"config.data.annotations {cfg.annotations!r}"
    for i, a in enumerate(meta["annotations"]):
        where = f"{src}: annotations[{i}]"
        bbox = _field(a, "bbox", _box, "a list of numbers [x, y, w, h]", where)
        image_id = _field(a, "image_id", _image_id, "an image id (number or string)", where)
        if bbox is None or len(bbox) != 4:
            counts["box_degenerate"] += 1
            continue
        by_image[image_id].append(bbox)
    paths, boxes, sizes = [], [], []
    for i, im in enumerate(meta["images"]):
        where = f"{src}: images[{i}]"
        raw = by_image.pop(_field(im, "id", _image_id, "an image id (number or string)", where), [])
        name = _field(im, "file_name", _text, "a file name", where)
        if not name:
            counts["missing_file"] += 1
            continue
        w, h = (_field(im, k, int, "an integer pixel size", where) or 0 for k in ("width", "height"))
        if w <= 0 or h <= 0:
            w, h = _header_size(os.path.join(cfg.images_dir, name))
            counts["size_from_file"] += 1
            if w <= 0:
                counts["missing_file"] += 1
                continue
        b = np.asarray(raw, np.float64).reshape(-1, 4)
        norm = np.stack([b[:, 0] / w, b[:, 1] / h, (b[:, 0] + b[:, 2]) / w,
                         (b[:, 1] + b[:, 3]) / h], axis=1)
        kept, c = clean_boxes(norm, cfg.min_box_area, cfg.max_box_area)
        counts.update(c)
        if not len(kept):
            counts["no_valid_box"] += 1
            continue
        paths.append(name)
        boxes.append(kept)
        sizes.append((w, h))
    counts["box_unknown_image"] += sum(len(v) for v in by_image.values())
    paths, boxes, sizes = _drop_missing(cfg.images_dir, paths, boxes, sizes, counts)
    return BoxIndex(cfg.images_dir, paths, boxes, sizes, counts, f"coco {cfg.annotations}")


def _image_id(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(v)
    return v


def _text(v) -> str:
    if not isinstance(v, str):
        raise TypeError(v)
    return v


def _header_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return 0, 0


def _drop_missing(root, paths, boxes, sizes, counts):
    keep = [i for i, p in enumerate(paths) if os.path.isfile(os.path.join(root, p))]
    counts["missing_file"] += len(paths) - len(keep)
    return [paths[i] for i in keep], [boxes[i] for i in keep], [sizes[i] for i in keep]


def _scan_images(root: str, ext: str) -> dict[str, str]:
    """ImageID -> path relative to `root`, for files `<ImageID><ext>` in `root` or one level of
    subfolders (the CVDF download unpacks to train_0 .. train_f)."""
    found = {}
    for entry in os.scandir(root):
        if entry.is_dir():
            for sub in os.scandir(entry.path):
                if sub.name.endswith(ext):
                    found[sub.name[: -len(ext)]] = os.path.join(entry.name, sub.name)
        elif entry.name.endswith(ext):
            found[entry.name[: -len(ext)]] = entry.name
    return found


def openimages_source(cfg) -> BoxIndex:
    """The OpenImages box CSV (`oidv6-train-annotations-bbox.csv`: ImageID, ..., XMin, XMax,
    YMin, YMax normalised, ...) with the images as `<ImageID><image_ext>` in `images_dir`."""
    _require(cfg.annotations, "annotations", "annotation file")
    _require(cfg.images_dir, "images_dir", "images folder")
    files = _scan_images(cfg.images_dir, cfg.image_ext)
    by_image = collections.defaultdict(list)
    counts = collections.Counter()
    lines = csv_lines(cfg.annotations)
    _, header = next(lines, (0, None))
    try:
        col = {k: (header or []).index(k) for k in ("ImageID", "XMin", "XMax", "YMin", "YMax")}
    except ValueError:
        raise ValueError(f"config.data.annotations {cfg.annotations!r}: header {header} "
                         "lacks ImageID/XMin/XMax/YMin/YMax; is it an OpenImages box CSV?")
    for n, row in lines:
        if row is None or len(row) != len(header):
            counts["malformed_row"] += 1
            log.debug("%s:%d: malformed CSV line (%s fields, header has %d)", cfg.annotations, n,
                      "unparseable" if row is None else len(row), len(header))
            continue
        try:
            by_image[row[col["ImageID"]]].append(
                (float(row[col["XMin"]]), float(row[col["YMin"]]),
                 float(row[col["XMax"]]), float(row[col["YMax"]])))
        except ValueError:
            counts["box_degenerate"] += 1
    paths, boxes = [], []
    for image_id in sorted(by_image):  # sorted: the index order must not depend on the CSV's
        kept, c = clean_boxes(np.asarray(by_image[image_id]), cfg.min_box_area,
                              cfg.max_box_area)
        counts.update(c)
        if not len(kept):
            counts["no_valid_box"] += 1
            continue
        if image_id not in files:
            counts["missing_file"] += 1
            continue
        paths.append(files[image_id])
        boxes.append(kept)
    return BoxIndex(cfg.images_dir, paths, boxes, [(0, 0)] * len(paths), counts,
                    f"openimages {cfg.annotations}")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
BOX_MANIFESTS = ("boxes.jsonl", "boxes.csv")


class MaskFolder:
    """Images with an object mask each, as flat arrays: record i is `paths[i]` with the mask
    `masks[i]` (both relative to `root`). The mask's bounding box is the training box, found
    when the sample is made (reading every mask up front would decode the whole folder)."""

    def __init__(self, root: str, paths: list[str], masks: list[str], index_counts, name: str):
        if not paths:
            raise ValueError(f"{name}: no image with a mask (counts: {dict(index_counts)})")
        self.root, self.name = root, name
        self.paths = np.array([p.encode() for p in paths], dtype=np.bytes_)
        self.masks = np.array([p.encode() for p in masks], dtype=np.bytes_)
        self.index_counts = {k: int(v) for k, v in index_counts.items() if v}
        log.info("%s: %d image + mask pairs; dropped at index time: %s", name, len(paths), self.index_counts)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Record:
        rel = self.paths[i].decode("utf-8")
        return Record(key=rel, boxes=np.zeros((0, 4), np.float32), path=os.path.join(self.root, rel),
                      mask_path=os.path.join(self.root, self.masks[i].decode("utf-8")))


def folder_source(cfg):
    """Your own images: `images_dir` holds `NAME.{jpg,png,...}` with either an object mask
    `NAME<mask_suffix>.png` each (white = object; its bounding box is the training box and, with
    `use_given_masks`, its shape the hole), or a box manifest (`annotations`, else
    `images_dir/boxes.jsonl` or `boxes.csv`): rows `{"image": "NAME.jpg", "box": [x0, y0, x1,
    y1]}` (or `"boxes": [[...], ...]`) / CSV columns `image,x0,y0,x1,y1`, in pixels of the image
    as displayed. Images without a mask / box, and masks or rows without an image, are counted."""
    _require(cfg.images_dir, "images_dir", "images folder")
    manifest = cfg.annotations or next((os.path.join(cfg.images_dir, m) for m in BOX_MANIFESTS
                                        if os.path.isfile(os.path.join(cfg.images_dir, m))), "")
    names = sorted(e.name for e in os.scandir(cfg.images_dir)
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
    if manifest:
        _require(manifest, "annotations", "annotation file")
        if cfg.use_given_masks:
            raise ValueError(f"config.data.use_given_masks needs object masks, but {manifest} gives "
                             "boxes; remove it (and config.data.annotations) to use NAME_mask.png files")
        if cfg.get("ref_backdrop_prob", 0.0) > 0:
            raise ValueError(f"config.data.ref_backdrop_prob={cfg.ref_backdrop_prob} needs object masks, "
                             f"but {manifest} gives boxes; set it to 0, or remove the manifest (and "
                             "config.data.annotations) to use NAME_mask.png files")
        return _folder_boxes(cfg, manifest, set(names))
    suffix = cfg.mask_suffix
    masks = {n[: -len(suffix) - 4] for n in names if n.lower().endswith(suffix + ".png")}
    images = [n for n in names if not n.lower().endswith(suffix + ".png")]
    counts = collections.Counter()
    paths, mask_paths = [], []
    for name in images:
        stem = os.path.splitext(name)[0]
        if stem in masks:
            paths.append(name)
            mask_paths.append(f"{stem}{suffix}.png")
            masks.discard(stem)
        else:
            counts["missing_mask"] += 1
    counts["missing_file"] += len(masks)  # masks whose image is absent
    return MaskFolder(cfg.images_dir, paths, mask_paths, counts, f"folder {cfg.images_dir}")


def _manifest_rows(path: str):
    """(line, image, [[x0, y0, x1, y1], ...]) of a boxes .jsonl / .csv; malformed rows give
    boxes None."""
    if path.endswith(".csv"):
        lines = csv_lines(path)  # a stray quote costs its own row, not the rest of the file
        _, header = next(lines, (0, None))
        for n, fields in lines:
            row = dict(zip(header, fields)) if fields and header and len(fields) == len(header) else {}
            try:
                yield n, row["image"], [[float(row[k]) for k in ("x0", "y0", "x1", "y1")]]
            except (KeyError, TypeError, ValueError):
                yield n, (row.get("image") or ""), None
        return
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                boxes = row["boxes"] if "boxes" in row else [row["box"]]
                yield n, str(row["image"]), [[float(v) for v in b] for b in boxes]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                yield n, "", None


def _display_size(path: str) -> tuple[int, int]:
    """(W, H) of an image as displayed (EXIF orientation applied), from its header; (0, 0) if
    unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = exif_orientation(im)
    except Exception:
        return 0, 0
    return (h, w) if orientation in SWAPS_SIDES else (w, h)


def _folder_boxes(cfg, manifest: str, present: set[str]) -> BoxIndex:
    by_image = collections.defaultdict(list)
    counts = collections.Counter()
    for line, image, boxes in _manifest_rows(manifest):
        if boxes is None or any(len(b) != 4 for b in boxes):
            if not counts["box_degenerate"]:
                log.warning("%s:%d: not a row with an image and [x0, y0, x1, y1] box(es); counted as "
                            "box_degenerate (further ones are counted quietly)", manifest, line)
            counts["box_degenerate"] += 1
        else:
            by_image[image] += boxes
    paths, kept_boxes = [], []
    for image in sorted(by_image):
        if image not in present:
            counts["missing_file"] += 1
            continue
        w, h = _display_size(os.path.join(cfg.images_dir, image))
        if w <= 0:
            counts["undecodable"] += 1
            continue
        b = np.asarray(by_image[image], np.float64) / np.array([w, h, w, h])
        kept, c = clean_boxes(b, cfg.min_box_area, cfg.max_box_area)
        counts.update(c)
        if not len(kept):
            counts["no_valid_box"] += 1
            continue
        paths.append(image)
        kept_boxes.append(kept)
    counts["missing_box"] += len(present - set(by_image) - {os.path.basename(manifest)})
    return BoxIndex(cfg.images_dir, paths, kept_boxes, [(0, 0)] * len(paths), counts,
                    f"folder {cfg.images_dir} ({os.path.basename(manifest)})")


class TfdsSource:
    """A TFDS dataset with `image` and `objects/bbox` ((ymin, xmin, ymax, xmax) normalised),
    e.g. coco/2017 or open_images_v4, read with `tfds.data_source` (random access, ArrayRecord;
    no TensorFlow needed). Images stay encoded (SkipDecoding) so they go through the same
    decoder and bad-data handling as files. Boxes are filtered per sample, not at index time
    (reading every record's boxes up front would decode the whole dataset)."""

    def __init__(self, cfg):
        self.name, self.split = cfg.tfds_name, cfg.tfds_split
        self.data_dir = cfg.tfds_data_dir or None
        self.index_counts = {}
        self._ds = None
        self._len = len(self._open())
        log.info("tfds %s[%s]: %d records", self.name, self.split, self._len)

    def _open(self):
        if self._ds is None:
            try:
                import tensorflow_datasets as tfds
            except ImportError as e:
                raise ImportError("config.data.source='tfds' needs tensorflow-datasets and "
                                  "array-record: pip install 'pbe_jax[tfds]'") from e
            try:
                self._ds = tfds.data_source(
                    self.name, split=self.split, data_dir=self.data_dir,
                    decoders={"image": tfds.decode.SkipDecoding()})
            except Exception as e:
                raise FileNotFoundError(
                    f"config.data.tfds_name={self.name!r} split={self.split!r} "
                    f"data_dir={self.data_dir!r}: cannot open as an ArrayRecord TFDS dataset "
                    f"(prepare it with file_format='array_record'): {e}") from e
        return self._ds

    def __getstate__(self):  # the reader holds file handles; reopen in each worker
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        ex = self._open()[int(i)]
        objects = ex.get("objects", {})
        yxyx = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
        key = ex.get("image/filename", str(i))
        key = key.decode() if isinstance(key, bytes) else str(key)
        return Record(key=key, boxes=yxyx[:, [1, 0, 3, 2]], data=bytes(ex["image"]))


class SyntheticSource:
    """`synthetic_num_images` procedural scenes (synthetic.py), no files."""

    def __init__(self, cfg):
        self.n = int(cfg.synthetic_num_images)
        self.seed = int(cfg.synthetic_seed)
        self.sides = (int(cfg.synthetic_min_side), int(cfg.synthetic_max_side))
        self.style = str(cfg.synthetic_style)
        self.index_counts = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        scene = draw_scene(int(i), seed=self.seed, min_side=self.sides[0], max_side=self.sides[1],
                           style=self.style)
        return Record(key=f"synthetic/{i}", boxes=scene.boxes, pixels=scene.image,
                      owner=scene.owner)


# config.data.source -> the builder of that source (taking config.data).
SOURCES = {"coco": coco_source, "openimages": openimages_source, "tfds": TfdsSource,
           "synthetic": SyntheticSource, "folder": folder_source}
# The sources whose records carry object masks (`Record.owner` / `.mask_path`; the folder source
# when it reads NAME_mask.png files, not a box manifest).
MASK_SOURCES = ("synthetic", "folder")


def make_source(cfg):
    """The source named by `cfg.source`."""
    if cfg.source not in SOURCES:
        raise ValueError(f"config.data.source={cfg.source!r}; expected one of {sorted(SOURCES)}")
    if cfg.use_given_masks and cfg.source != "folder":
        raise ValueError(f"config.data.use_given_masks needs object masks, which only the 'folder' "
                         f"source reads; config.data.source={cfg.source!r}")
    if cfg.get("ref_backdrop_prob", 0.0) > 0 and cfg.source not in MASK_SOURCES:
        raise ValueError(f"config.data.ref_backdrop_prob={cfg.ref_backdrop_prob} needs object masks, "
                         f"which only the {MASK_SOURCES} sources give (folder: NAME{cfg.mask_suffix}.png "
                         f"files); config.data.source={cfg.source!r}. Set it to 0.")
    return SOURCES[cfg.source](cfg)
