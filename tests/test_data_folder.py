"""The `folder` data source: your own images with an object mask (or a box manifest) each.

A folder of 10 image + mask pairs and 2 broken pairs trains 5 steps with the real loop, and the
broken pairs are counted; the mask's bounding box is the training box, its shape the hole with
`use_given_masks`; masks of any bit depth are scaled, not clipped; box manifests in .jsonl / .csv.
"""
import io
import json
import os
import subprocess

import cv2
import numpy as np
import pytest
from PIL import Image

from pbe_jax.data import decode as dec
from pbe_jax.data import transforms as tr
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import PbeSample
from pbe_jax.data.sources import make_source
from pbe_jax.data.synthetic import synthetic_scene
from tests.train_utils import REPO, read_metrics, subprocess_env, tiny_config, train_cmd


def _pair(i: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene `[H, W, 3]` and an ellipse mask `[H, W]` uint8 over its first object."""
    img, boxes = synthetic_scene(i, min_side=80, max_side=120)
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (boxes[0] * [w, h, w, h]).astype(int)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, 255, -1)
    return img, mask


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _folder(root, n_good=10) -> str:
    d = os.path.join(root, "images")
    os.makedirs(d)
    for i in range(n_good):
        img, mask = _pair(i)
        with open(os.path.join(d, f"img{i}.jpg"), "wb") as f:
            f.write(_jpeg(img))
        Image.fromarray(mask).save(os.path.join(d, f"img{i}_mask.png"))
    img, mask = _pair(20)
    with open(os.path.join(d, "cut.jpg"), "wb") as f:  # broken: the image file is cut short
        f.write(_jpeg(img)[:600])
    Image.fromarray(mask).save(os.path.join(d, "cut_mask.png"))
    with open(os.path.join(d, "blank.jpg"), "wb") as f:  # broken: the mask marks nothing
        f.write(_jpeg(img))
    Image.fromarray(np.zeros_like(mask)).save(os.path.join(d, "blank_mask.png"))
    Image.fromarray(img).save(os.path.join(d, "nomask.png"))  # an image with no mask
    return d


@pytest.mark.slow
def test_folder_trains_and_counts_broken_pairs(tmp_path):
    """The training CLI on the folder (one device, the tiny config the other CLI tests compile)."""
    images = _folder(str(tmp_path))
    over = {"data.source": "folder", "data.images_dir": images, "data.use_given_masks": True}
    source = make_source(tiny_config(**over).data)
    assert len(source) == 12 and source.index_counts == {"missing_mask": 1}
    workdir = str(tmp_path / "run")
    r = subprocess.run(train_cmd(workdir, **over, **{"train.num_steps": 5, "ckpt_every_steps": 5}), cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(workdir)
    assert sorted(rows) == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in rows.values())
    last = rows[5]  # 40 samples drawn from 12 records: each broken pair came up and was counted
    assert last["data/missing_mask"] == 1
    assert last.get("data/truncated", 0) + last.get("data/undecodable", 0) > 0, last
    assert last["data/mask_empty"] > 0, last


def _sample(cfg, rec_source, index=0, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(dec.BAD_REASONS), np.int32)
    return PbeSample(rec_source, cfg).make(index, rng, counts), counts


def test_mask_box_and_given_mask_hole(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    img, _ = _pair(3)
    img = np.ascontiguousarray(cv2.resize(img, (96, 96)))  # square: the crop is the whole image
    mask = np.zeros((96, 96), np.uint8)
    mask[30:60, 20:70] = 255
    mask[40:50, 30:40] = 0  # a hole in the object: a shape no box or Bezier curve has
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(mask).save(d / "a_mask.png")
    cfg = data_config("demo")
    cfg.update(source="folder", images_dir=str(d), ref_flip_prob=0.0, ref_rotate_prob=0.0, ref_blur_prob=0.0,
               ref_elastic_prob=0.0, arbitrary_mask_prob=0.0)
    np.testing.assert_array_equal(tr.mask_box(mask > 0), np.float32([[20 / 96, 30 / 96, 70 / 96, 60 / 96]]))
    # the training box is the mask's: the box hole covers it
    sample, counts = _sample(cfg, make_source(cfg))
    keep = cv2.resize(sample["mask"][..., 0], (96, 96), interpolation=cv2.INTER_NEAREST)
    assert (keep[mask > 0] < 128).all() and not counts.any()
    # use_given_masks: the hole is the mask itself, inner hole included
    cfg.use_given_masks = True
    sample, _ = _sample(cfg, make_source(cfg))
    want = cv2.resize(np.where(mask > 0, 0, 255).astype(np.uint8), (cfg.resolution,) * 2,
                      interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(sample["mask"][..., 0], want)


def test_mask_files_of_any_depth_and_frame():
    img = np.zeros((40, 60, 3), np.uint8)
    header = dec.probe(_jpeg(img))
    m16 = np.zeros((40, 60), np.uint16)
    m16[:, :20] = int(0.3 * 65535)  # 30% grey: not the object (clipping would make it white)
    m16[:, 40:] = 65535
    got = dec.decode_mask(cv2.imencode(".png", m16)[1].tobytes(), header)
    assert not got[:, :40].any() and got[:, 40:].all()
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:20, 10:20, :3] = 255
    got = dec.decode_mask(cv2.imencode(".png", rgba)[1].tobytes(), header)
    assert got.sum() == 100 and got[10:20, 10:20].all()
    with pytest.raises(dec.BadImage, match="mask 30x40, image 60x40") as e:
        dec.decode_mask(cv2.imencode(".png", np.zeros((40, 30), np.uint8))[1].tobytes(), header, "k")
    assert e.value.reason == "mask_size_mismatch"
    with pytest.raises(dec.BadImage) as e:
        dec.decode_mask(b"not a png", header)
    assert e.value.reason == "mask_undecodable"
    # an EXIF-rotated image (orientation 6: displayed 40 wide, 60 high) with a mask of its
    # stored 60x40 pixels: the mask turns with the image
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", exif=exif.tobytes())
    rotated = dec.probe(buf.getvalue())
    raw = np.zeros((40, 60), np.uint8)
    raw[0, 0] = 255  # top-left as stored -> top-right as displayed
    got = dec.decode_mask(cv2.imencode(".png", raw)[1].tobytes(), rotated)
    assert got.shape == (60, 40) and got[0, 39] and got.sum() == 1


def test_box_manifests(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name, (w, h) in (("a.jpg", (100, 80)), ("b.png", (64, 64)), ("c.jpg", (50, 50))):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(d / name)
    rows = [{"image": "a.jpg", "box": [10, 20, 60, 70]}, {"image": "b.png", "boxes": [[0, 0, 32, 32], [1, 1, 2, 2]]},
            {"image": "gone.jpg", "box": [0, 0, 10, 10]}, {"image": "a.jpg", "box": "x"}]
    (d / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    cfg = data_config("demo")
    cfg.update(source="folder", images_dir=str(d))
    src = make_source(cfg)  # boxes.jsonl found in images_dir
    assert [src[i].key for i in range(len(src))] == ["a.jpg", "b.png"]
    np.testing.assert_allclose(src[0].boxes, [[0.1, 0.25, 0.6, 0.875]])
    np.testing.assert_allclose(src[1].boxes, [[0, 0, 0.5, 0.5]])  # the 1 px box is filtered
    assert src.index_counts == {"box_degenerate": 2, "missing_file": 1, "missing_box": 1}
    csv_path = tmp_path / "b.csv"
    csv_path.write_text("image,x0,y0,x1,y1\nc.jpg,5,5,45,45\nc.jpg,5,5,oops,45\n")
    cfg.annotations = str(csv_path)
    src = make_source(cfg)
    assert len(src) == 1 and src.index_counts["box_degenerate"] == 1
    np.testing.assert_allclose(src[0].boxes, [[0.1, 0.1, 0.9, 0.9]])
    cfg.use_given_masks = True
    with pytest.raises(ValueError, match="use_given_masks needs object masks, but .*b.csv gives boxes"):
        make_source(cfg)
    cfg.source = "coco"
    with pytest.raises(ValueError, match="use_given_masks needs object masks"):
        make_source(cfg)
