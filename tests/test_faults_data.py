"""Bad data rows (issue 15): a decompression bomb is a counted `too_large` record, a stray quote
in a CSV costs one row (not the rest of the file), and wrongly typed COCO fields fail naming
the file, the record and the field."""
from __future__ import annotations

import csv
import json
import struct
import zlib

import numpy as np
import pytest

from pbe_jax.data import decode as dec
from pbe_jax.data.pipeline import PbeSample
from pbe_jax.data.sources import Record, make_source
from pbe_jax.data.synthetic import synthetic_scene
from tests.test_data_bad_inputs import NBOX, _cfg, _write_coco

# The reasons before issue 15, in their order: saved loader states count in this order.
OLD_REASONS = ("missing_file", "undecodable", "truncated", "image_too_small", "no_valid_box",
               "grayscale", "alpha_dropped", "cmyk", "palette", "high_bit_depth", "exif_rotated",
               "exif_boxes_rotated", "box_clipped", "box_degenerate", "upsampled",
               "mask_undecodable", "mask_empty", "mask_size_mismatch")


def png_bomb(w: int, h: int) -> bytes:
    """A valid 8-bit grayscale PNG of w x h black pixels: a few hundred KB on disk that decode
    to w * h bytes (the classic decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = bytes(w + 1)  # filter byte 0 + w pixels
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_large_png_is_probed_without_decoding_a_pixel(monkeypatch, tmp_path):
    """PIL's PNG `getexif()` decodes the whole image: the probe (and the folder source's size
    check) must read the header only, or an 81-megapixel PNG costs 240 MB and seconds per visit
    before `data.max_image_pixels` rejects it."""
    import io

    from PIL import Image, PngImagePlugin

    from pbe_jax.data.sources import _display_size

    def no_decoding(self, *a, **k):
        raise AssertionError("the probe decoded the pixels")

    big = png_bomb(9000, 9000)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG", exif=exif.tobytes())
    (tmp_path / "big.png").write_bytes(big)
    (tmp_path / "rotated.png").write_bytes(buf.getvalue())
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    h = dec.probe(big)
    assert (h.raw_size, h.orientation, h.format) == ((9000, 9000), 1, "PNG")
    h = dec.probe(buf.getvalue())  # a PNG's eXIf orientation is still read
    assert (h.raw_size, h.orientation, h.size) == ((40, 30), 6, (30, 40))
    assert _display_size(str(tmp_path / "big.png")) == (9000, 9000)
    assert _display_size(str(tmp_path / "rotated.png")) == (30, 40)


def test_too_large_is_appended_to_the_bad_reasons():
    assert dec.BAD_REASONS == (*OLD_REASONS, "too_large")


@pytest.mark.parametrize("side,limit", [(14000, None), (9000, 40_000_000)])
def test_decompression_bomb_is_skipped_as_too_large_before_decoding(side, limit):
    """14000^2 px trips PIL's own bomb check (which raised uncaught before); 9000^2 px is under
    it but over `config.data.max_image_pixels`: neither is decoded (it would be 81-196 MB)."""
    cfg = _cfg()
    if limit:
        cfg.max_image_pixels = limit
    sample = PbeSample([Record(key="bomb.png", boxes=NBOX, data=png_bomb(side, side))], cfg)
    with pytest.raises(dec.BadImage) as e:
        sample.make(0, np.random.default_rng(0), np.zeros(len(dec.BAD_REASONS), np.int32))
    assert e.value.reason == "too_large", e.value


def _openimages(tmp_path, stray_quote: bool):
    """An OpenImages box CSV of 4 images (60 rows); with `stray_quote`, row 3 has an unclosed
    quote in its LabelName."""
    import cv2

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    lines = ["ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
             "IsGroupOf,IsDepiction,IsInside"]
    for i in range(4):
        img, _ = synthetic_scene(i, min_side=64, max_side=96)
        cv2.imwrite(str(images / f"{i:016x}.jpg"), img[..., ::-1])
    for r in range(60):
        i = r % 4
        x0, y0 = 0.05 + 0.01 * (r % 7), 0.1 + 0.01 * (r % 5)
        label = '"/m/0' if stray_quote and r == 3 else "/m/0"
        lines.append(f"{i:016x},xclick,{label},1,{x0},{x0 + 0.4},{y0},{y0 + 0.5},0,0,0,0,0")
    path = tmp_path / ("stray.csv" if stray_quote else "clean.csv")
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg()
    cfg.source, cfg.annotations, cfg.images_dir = "openimages", str(path), str(images)
    return cfg


def test_csv_with_a_stray_quote_loses_only_that_row(tmp_path):
    bad, clean = _openimages(tmp_path, True), _openimages(tmp_path, False)
    with open(bad.annotations, newline="") as f:  # the failure: the rest of the file is one field
        assert len(list(csv.reader(f))) < 10
    got, want = make_source(bad), make_source(clean)
    assert got.index_counts.get("malformed_row") == 1, got.index_counts
    assert "malformed_row" not in want.index_counts
    assert len(got.boxes) == len(want.boxes) - 1  # exactly one box (row 3's) is missing
    assert [p for p in got.paths] == [p for p in want.paths]


def _coco(tmp_path, mutate):
    entries = [(f"im{i}.jpg", b"x", [(10, 10, 40, 30)], (96, 72)) for i in range(3)]
    path, images = _write_coco(str(tmp_path), entries)
    with open(path) as f:
        meta = json.load(f)
    mutate(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    cfg = _cfg()
    cfg.source, cfg.annotations, cfg.images_dir = "coco", path, images
    return cfg


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m["images"][1].update(width="abc"), r"images\[1\]: field 'width' is 'abc', not an integer"),
    (lambda m: m["annotations"].__setitem__(2, None), r"annotations\[2\]: is None, not an object"),
    (lambda m: m["annotations"][0].update(bbox=["a", 1, 2, 3]), r"annotations\[0\]: field 'bbox' is"),
    (lambda m: m["images"][0].update(file_name=7), r"images\[0\]: field 'file_name' is 7, not a file name"),
])
def test_coco_field_type_errors_name_the_file_record_and_field(tmp_path, mutate, message):
    cfg = _coco(tmp_path, mutate)
    with pytest.raises(ValueError, match=r"instances\.json'?: " + message):
        make_source(cfg)


def test_folder_box_csv_with_a_stray_quote_loses_only_that_row(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(d / name)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text('image,x0,y0,x1,y1\na.jpg,10,20,60,70\n"b.jpg,10,20,60,70\nc.jpg,10,20,60,70\n'
                     "a.jpg,20,10,70,60\n")
    cfg = _cfg()
    cfg.source, cfg.images_dir, cfg.annotations = "folder", str(d), str(boxes)
    src = make_source(cfg)
    assert [src[i].key for i in range(len(src))] == ["a.jpg", "c.jpg"]  # b's only row is the bad one
    assert len(src[0].boxes) == 2  # a's row after the stray quote is kept
    assert src.index_counts["box_degenerate"] == 1, src.index_counts
