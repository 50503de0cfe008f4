"""Bad data never stops a run: every case is fixed or skipped, and counted by reason."""
import io
import json
import logging
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pbe_jax.data import decode as dec
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import PbeSample, make_loader
from pbe_jax.data.sources import Record, make_source
from pbe_jax.data.synthetic import synthetic_scene

RED = (240, 16, 16)


def _cfg():
    c = data_config("demo")
    # No reference augmentation and box masks only, so the reference shows the object as is.
    c.ref_flip_prob = c.ref_rotate_prob = c.ref_blur_prob = c.ref_elastic_prob = 0.0
    c.arbitrary_mask_prob = 0.0
    c.prefetch = 0
    return c


def _picture(w=96, h=72, box=(30, 20, 70, 56)):
    img, _ = synthetic_scene(7, min_side=max(w, h), max_side=max(w, h))
    img = np.ascontiguousarray(cv2.resize(img, (w, h)))
    img[box[1]:box[3], box[0]:box[2]] = RED
    return img


def _encode(img, fmt="JPEG", mode=None, exif_orientation=None, **kw):
    im = Image.fromarray(img)
    if mode:
        im = im.convert(mode)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _norm(box, w, h):
    return np.array([[box[0] / w, box[1] / h, box[2] / w, box[3] / h]], np.float32)


BOX = (30, 20, 70, 56)
NBOX = _norm(BOX, 96, 72)


def _cases():
    """name -> (Record, expected reasons (fixed) or the skip reason)."""
    pic = _picture()
    jpeg = _encode(pic, quality=95)
    rgb16 = cv2.imencode(".png", (pic.astype(np.uint16) * 257)[..., ::-1])[1].tobytes()
    gray16 = _encode((pic[..., 0].astype(np.uint16) * 257), "PNG")
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): store the pixels rotated
    # counter-clockwise, so that the displayed image is `pic`.
    raw = np.ascontiguousarray(np.rot90(pic, k=1))  # [96, 72]: raw W=72, H=96
    exif_jpeg = _encode(raw, quality=95, exif_orientation=6)
    # The same box in the raw frame: display (u, v) = (1 - v_raw, u_raw) for orientation 6.
    raw_box = dec.orient_boxes(NBOX, 8)  # 8 is the inverse of 6
    rec = lambda data, boxes=NBOX, **kw: Record(key="x", boxes=boxes, data=data, **kw)  # noqa
    return {
        "good": (rec(jpeg), set()),
        "truncated": (rec(jpeg[: len(jpeg) // 2]), "truncated"),
        "garbage": (rec(np.random.default_rng(0).bytes(3000)), "undecodable"),
        "empty": (rec(b""), "undecodable"),
        "grayscale": (rec(_encode(pic, mode="L")), {"grayscale"}),
        "rgba": (rec(_encode(pic, "PNG", mode="RGBA")), {"alpha_dropped"}),
        "cmyk": (rec(_encode(pic, mode="CMYK", quality=95)), {"cmyk"}),
        "palette": (rec(_encode(pic, "PNG", mode="P")), {"palette"}),
        "rgb16": (rec(rgb16), {"high_bit_depth"}),
        "gray16": (rec(gray16), {"high_bit_depth", "grayscale"}),
        "exif_display_frame": (rec(exif_jpeg, annotated_size=(96, 72)), {"exif_rotated"}),
        "exif_raw_frame": (rec(exif_jpeg, boxes=raw_box, annotated_size=(72, 96)),
                           {"exif_rotated", "exif_boxes_rotated"}),
        "tiny": (rec(_encode(pic[:10, :12])), "image_too_small"),
        "small": (rec(_encode(_picture(40, 30, (10, 8, 30, 24))),
                      boxes=_norm((10, 8, 30, 24), 40, 30)), {"upsampled"}),
        "box_outside": (rec(jpeg, boxes=np.array([[0.3, 0.3, 0.75, 1.4]], np.float32)),
                        {"box_clipped"}),
        "degenerate_box": (rec(jpeg, boxes=np.concatenate([NBOX, [[0.5, 0.5, 0.5, 0.9]]])),
                           {"box_degenerate"}),
        "no_valid_box": (rec(jpeg, boxes=np.array([[0.1, 0.1, 0.12, 0.12]], np.float32)),
                         "no_valid_box"),
        "missing_file": (Record(key="gone", boxes=NBOX, path="/nonexistent/x.jpg"),
                         "missing_file"),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_input_is_fixed_or_skipped_and_counted(name):
    record, expected = CASES[name]
    cfg = _cfg()
    sample = PbeSample([record], cfg)
    counts = np.zeros(len(dec.BAD_REASONS), np.int32)
    if isinstance(expected, str):
        with pytest.raises(dec.BadImage) as e:
            sample.make(0, np.random.default_rng(0), counts)
        assert e.value.reason == expected
        return
    out = sample.make(0, np.random.default_rng(0), counts)
    got = {r for r, c in zip(dec.BAD_REASONS, counts) if c}
    if "upsampled" not in expected:  # 64 px crops of a 72 px image are upsampled: normal
        got.discard("upsampled")
    assert got == expected
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
    assert out["reference"].shape == (32, 32, 3)
    if name in ("good", "cmyk", "rgba", "palette", "rgb16", "exif_display_frame",
                "exif_raw_frame", "small"):
        # The reference is the red object (boxes and pixels agree, also after EXIF rotation).
        ref = out["reference"].astype(int)
        centre = ref[8:24, 8:24].reshape(-1, 3).mean(0)
        assert centre[0] > 180 and centre[1] < 80 and centre[2] < 80, (name, centre)
        # ... and the hole of the source image sits on it.
        hole = out["mask"][..., 0] < 128
        red = (out["image"][..., 0] > 180) & (out["image"][..., 1] < 80)
        assert (red & hole).sum() > 0.8 * red.sum() > 0


def test_exif_orientation_matches_pil_for_all_eight():
    from PIL import ImageOps

    pic = _picture(20, 12)
    for orientation in range(1, 9):
        data = _encode(pic, "PNG", exif_orientation=orientation)
        header = dec.probe(data)
        assert header.orientation == orientation
        ours = dec.decode(data, header)
        ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        np.testing.assert_array_equal(ours, ref)
        assert header.size == (ref.shape[1], ref.shape[0])
        # orient_boxes moves boxes with the pixels: the red box stays red.
        raw_mask = np.zeros((12, 20), np.uint8)
        raw_mask[2:7, 3:11] = 1
        shown = dec.orient(raw_mask[..., None], orientation)[..., 0]
        b = dec.orient_boxes(np.array([[3 / 20, 2 / 12, 11 / 20, 7 / 12]]), orientation)[0]
        hh, ww = shown.shape
        ys, xs = np.nonzero(shown)
        np.testing.assert_allclose(b, [xs.min() / ww, ys.min() / hh, (xs.max() + 1) / ww,
                                       (ys.max() + 1) / hh], atol=1e-6)


def test_large_jpeg_is_decoded_at_reduced_size(monkeypatch):
    big = _picture(800, 600, (300, 200, 500, 420))
    data = _encode(big, quality=95)
    header = dec.probe(data)
    quarter = dec.decode(data, header, reduce=4)
    assert quarter.shape == (150, 200, 3)
    ref = cv2.resize(big, (200, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(quarter.astype(int) - ref).mean() < 6
    # End to end at 64 px: the sample is made from a reduced decode and is still right.
    reductions = []
    decode = dec.decode
    monkeypatch.setattr(dec, "decode", lambda d, h, reduce=1: reductions.append(reduce)
                        or decode(d, h, reduce))
    record = Record(key="big", boxes=_norm((300, 200, 500, 420), 800, 600), data=data)
    out = PbeSample([record], _cfg()).make(
        0, np.random.default_rng(0), np.zeros(len(dec.BAD_REASONS), np.int32))
    assert reductions and reductions[0] > 1
    centre = out["reference"][8:24, 8:24].reshape(-1, 3).mean(0)
    assert centre[0] > 180 and centre[1] < 80, centre
    hole = out["mask"][..., 0] < 128
    red = (out["image"][..., 0] > 180) & (out["image"][..., 1] < 80)
    assert (red & hole).sum() > 0.8 * red.sum() > 0


def test_bad_records_are_replaced_and_counts_survive_batching():
    records = [CASES[n][0] for n in ("good", "garbage", "truncated", "grayscale", "tiny",
                                     "missing_file", "exif_raw_frame")]
    cfg = _cfg()
    transform = PbeSample(records, cfg)
    total = np.zeros(len(dec.BAD_REASONS), np.int64)
    used = set()
    for i in range(40):
        s = transform.random_map(i % len(records), np.random.default_rng(i))
        total += s["bad_counts"]
        used.add(int(s["record"]))
        assert s["image"].shape == (64, 64, 3)
    assert used <= {0, 3, 6}  # only usable records come out
    got = {r: int(c) for r, c in zip(dec.BAD_REASONS, total) if c}
    for reason in ("undecodable", "truncated", "image_too_small", "missing_file", "grayscale",
                   "exif_rotated"):
        assert got.get(reason, 0) > 0, got


def test_all_bad_source_fails_with_a_clear_error():
    cfg = _cfg()
    transform = PbeSample([CASES["garbage"][0]] * 3, cfg)
    with pytest.raises(RuntimeError, match="unusable"):
        transform.random_map(0, np.random.default_rng(0))


def _write_coco(root, entries):
    """entries: (file name, bytes or None (not written), [(x, y, w, h)], (W, H))."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i, (name, data, boxes, (w, h)) in enumerate(entries):
        if data is not None:
            with open(os.path.join(root, "images", name), "wb") as f:
                f.write(data)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns), "image_id": i, "bbox": list(b), "category_id": 1})
    anns.append({"id": len(anns), "image_id": 999, "bbox": [1, 1, 5, 5], "category_id": 1})
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return path, os.path.join(root, "images")


def test_loader_runs_through_a_folder_of_bad_files(tmp_path, caplog):
    pic_box = [(30, 20, 40, 36)]
    good = _encode(_picture(), quality=90)
    entries = [(f"good{i}.jpg", good, pic_box, (96, 72)) for i in range(4)] + [
        ("trunc.jpg", good[:900], pic_box, (96, 72)),
        ("garbage.jpg", b"not an image at all", pic_box, (96, 72)),
        ("gray.jpg", _encode(_picture(), mode="L"), pic_box, (96, 72)),
        ("gone.jpg", None, pic_box, (96, 72)),  # listed, never written
        ("later_gone.jpg", good, pic_box, (96, 72)),  # deleted after indexing
        ("outside.jpg", good, [(60, 40, 80, 60)], (96, 72)),  # clipped at index time
        ("nobox.jpg", good, [(1, 1, 2, 2), (10, 10, 0, 5)], (96, 72)),  # filtered / degenerate
    ]
    cfg = _cfg()
    cfg.source = "coco"
    cfg.annotations, cfg.images_dir = _write_coco(str(tmp_path), entries)
    caplog.set_level(logging.INFO)
    loader = make_loader(cfg, global_batch_size=4, seed=0, mesh=None, process_index=0,
                         process_count=1)
    os.remove(os.path.join(cfg.images_dir, "later_gone.jpg"))
    loader._log_every = 3
    with loader:
        for _ in range(12):  # several epochs of 9 indexed records
            batch = next(loader)
            assert batch["image"].shape == (4, 64, 64, 3)
        counts = loader.bad_data_counts()
    for reason in ("missing_file", "box_clipped", "box_degenerate", "no_valid_box",
                   "box_unknown_image", "truncated", "undecodable", "grayscale"):
        assert counts.get(reason, 0) > 0, (reason, counts)
    assert any("bad data" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key", ["annotations", "images_dir"])
@pytest.mark.parametrize("source", ["coco", "openimages"])
def test_missing_annotations_or_images_fail_at_start(tmp_path, key, source):
    cfg = _cfg()
    cfg.source = source
    cfg.annotations, cfg.images_dir = _write_coco(str(tmp_path), [])
    setattr(cfg, key, str(tmp_path / "does_not_exist"))
    with pytest.raises(FileNotFoundError, match=f"config.data.{key}"):
        make_source(cfg)
