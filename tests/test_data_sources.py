"""Each source on a tiny on-disk fixture made here; the preview CLI; the benchmark's pieces."""
import csv
import importlib.util
import io
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pbe_jax.data.bench import per_process_rate, transfer_cost, write_coco_fixture
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import make_dataset
from pbe_jax.data.sources import make_source
from pbe_jax.data.synthetic import synthetic_scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
    c = data_config("demo")
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _check_sample(s, cfg):
    r, rr = cfg.resolution, cfg.reference_size
    assert s["image"].shape == (r, r, 3) and s["image"].dtype == np.uint8
    assert s["mask"].shape == (r, r, 1) and s["mask"].dtype == np.uint8
    assert s["reference"].shape == (rr, rr, 3) and s["reference"].dtype == np.uint8
    assert (s["mask"] == 0).any() and (s["mask"] == 255).any()  # a hole and kept pixels
    assert s["image"].std() > 5 and s["reference"].std() > 5  # real content, not a blank


def test_coco_source(tmp_path):
    ann, images = write_coco_fixture(str(tmp_path), 5, width=96, height=64)
    cfg = _cfg(source="coco", annotations=ann, images_dir=images)
    src = make_source(cfg)
    assert len(src) == 5
    rec = src[2]
    assert rec.path.endswith("000000000002.jpg") and rec.annotated_size == (96, 64)
    _, boxes = synthetic_scene(2, min_side=64, max_side=96)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    expected = boxes[(area >= 0.02) & (area <= 0.8)]
    np.testing.assert_allclose(rec.boxes, expected, atol=1e-5)  # xywh px -> normalised xyxy
    ds = make_dataset(cfg, seed=0)
    for i in range(3):
        _check_sample(ds[i], cfg)


def test_openimages_source(tmp_path):
    root = tmp_path / "train"
    for sub in ("train_0", "train_1"):
        (root / sub).mkdir(parents=True)
    rows, ids = [], []
    for i in range(4):
        img, boxes = synthetic_scene(i, min_side=64, max_side=96)
        image_id = f"{i:016x}"
        ids.append(image_id)
        cv2.imwrite(str(root / f"train_{i % 2}" / f"{image_id}.jpg"), img[..., ::-1])
        for x0, y0, x1, y1 in boxes:
            rows.append([image_id, "xclick", "/m/0", 1, x0, x1, y0, y1, 0, 0, 0, 0, 0])
    rows.append(["ffffffffffffffff", "xclick", "/m/0", 1, 0.1, 0.6, 0.1, 0.6, 0, 0, 0, 0, 0])
    rows.append([ids[0], "xclick", "/m/0", 1, 0.1, 0.12, 0.1, 0.12, 0, 0, 0, 0, 0])  # too small
    csv_path = tmp_path / "oidv6-train-annotations-bbox.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin",
                    "YMax", "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"])
        w.writerows(rows)
    cfg = _cfg(source="openimages", annotations=str(csv_path), images_dir=str(root))
    src = make_source(cfg)
    assert len(src) == 4  # the image without a file is left out and counted
    assert src.index_counts.get("missing_file") == 1
    assert src[1].path.endswith(os.path.join("train_1", f"{ids[1]}.jpg"))
    assert (src[0].boxes[:, 2] - src[0].boxes[:, 0] > 0.05).all()  # the tiny box is filtered
    ds = make_dataset(cfg, seed=0)
    for i in range(2):
        _check_sample(ds[i], cfg)


def _build_tfds(data_dir):
    """A tiny coco-like TFDS dataset in ArrayRecord format, built without TensorFlow (images
    are handed to TFDS already encoded)."""
    import tensorflow_datasets as tfds

    class TinyBoxes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                img, boxes = synthetic_scene(i, min_side=64, max_side=96)
                jpeg = cv2.imencode(".jpg", img[..., ::-1])[1].tobytes()
                yield i, {"image": io.BytesIO(jpeg), "image/filename": f"{i}.jpg",
                          "objects": {"bbox": [tfds.features.BBox(y0, x0, y1, x1)
                                               for x0, y0, x1, y1 in boxes]}}

    TinyBoxes(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "tiny_boxes"


def test_tfds_source(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    pytest.importorskip("array_record", reason="the tfds extra is not installed")
    name = _build_tfds(str(tmp_path))
    cfg = _cfg(source="tfds", tfds_name=name, tfds_split="train", tfds_data_dir=str(tmp_path))
    src = make_source(cfg)
    assert len(src) == 4
    keys = set()
    for i in range(4):
        rec = src[i]
        assert rec.data[:2] == b"\xff\xd8"  # still encoded: our decoder handles it
        keys.add(rec.key)
        # TFDS shuffles on write; the file name says which scene this is.
        _, boxes = synthetic_scene(int(rec.key[:-4]), min_side=64, max_side=96)
        np.testing.assert_allclose(rec.boxes, boxes, atol=1e-6)  # yxyx -> xyxy
    assert keys == {f"{i}.jpg" for i in range(4)}
    ds = make_dataset(cfg, seed=0)
    for i in range(2):
        _check_sample(ds[i], cfg)


def test_tfds_missing_dataset_fails_at_start(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    cfg = _cfg(source="tfds", tfds_name="no_such_dataset", tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds_name"):
        make_source(cfg)


def test_synthetic_scenes_are_deterministic_and_varied():
    a_img, a_boxes = synthetic_scene(5, seed=1, min_side=64, max_side=96)
    b_img, b_boxes = synthetic_scene(5, seed=1, min_side=64, max_side=96)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_boxes, b_boxes)
    c_img, _ = synthetic_scene(5, seed=2, min_side=64, max_side=96)
    assert a_img.shape != c_img.shape or not np.array_equal(a_img, c_img)
    sizes = {synthetic_scene(i, min_side=64, max_side=96)[0].shape for i in range(8)}
    assert len(sizes) > 4
    for i in range(8):
        img, boxes = synthetic_scene(i, min_side=64, max_side=96)
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        # Each box is tight around drawn pixels: its border rows differ from the background.
        h, w = img.shape[:2]
        x0, y0, x1, y1 = (boxes[0] * [w, h, w, h]).round().astype(int)
        assert img[y0:y1, x0:x1].std() > 0
    cfg = _cfg()
    ds = make_dataset(cfg, seed=0)
    _check_sample(ds[0], cfg)


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="config.data.source"):
        make_source(_cfg(source="laion"))


def test_preview_cli_with_a_config_file(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import ml_collections\n"
        "from pbe_jax.data.config import data_config\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = 0\n"
        "    c.data = data_config(arg or 'demo')\n"
        "    return c\n")
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pbe_jax.data.preview", f"--config={cfg_file}:demo",
         "--out", str(out), "--num", "6", "--config.data.resolution=48"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grid = cv2.imread(str(out))
    # 6 samples, 4 per row: 2 rows of 96 px tiles (+ 4 px gaps), 4 x (3 tiles + gap) wide.
    assert grid.shape == (2 * 100, 4 * (3 * 96 + 4), 3)
    assert "wrote" in proc.stdout


def test_preview_with_the_project_config(tmp_path):
    path = os.path.join(REPO, "configs", "pbe.py")
    if not os.path.exists(path):
        pytest.skip("configs/pbe.py not written yet")
    from pbe_jax.data.preview import write_preview

    spec = importlib.util.spec_from_file_location("pbe_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("demo")
    out = str(tmp_path / "grid.png")
    write_preview(config.data, out, num=4, seed=config.seed)
    grid = cv2.imread(out)
    assert grid is not None and grid.std() > 10


def test_benchmark_pieces_run(tmp_path):
    ann, images = write_coco_fixture(str(tmp_path), 3, width=96, height=64)
    cfg = _cfg(source="coco", annotations=ann, images_dir=images)
    r = per_process_rate(cfg, 4)
    assert r["samples_per_s"] > 0 and {"decode", "reference augment"} <= set(r["stage_ms"])
    t = transfer_cost(2, 32, 16, reps=2)
    assert t["float32_bytes"] == 4 * t["uint8_bytes"]
