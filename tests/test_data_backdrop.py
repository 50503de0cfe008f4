"""`config.data.ref_backdrop_prob`: references that are the object alone on a plain backdrop
(AnyDoor's background-removed references), cut out by the object's mask where a source knows it
(synthetic scenes, folder masks); refused, naming the field, where it does not."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pbe_jax.configs.validate import problems
from pbe_jax.data import decode as dec
from pbe_jax.data import transforms as tr
from pbe_jax.data.config import data_config
from pbe_jax.data.pipeline import PbeSample
from pbe_jax.data.sources import Record, make_source
from tests.train_utils import tiny_config

RED, BLUE = (230, 20, 20), (20, 40, 230)


def _cfg(**kw):
    c = data_config("demo")
    c.update(ref_flip_prob=0.0, ref_rotate_prob=0.0, ref_blur_prob=0.0, ref_elastic_prob=0.0)
    c.update(**kw)
    return c


def _geom(size, box):
    return tr.Geometry(size=size, box=box, extended=box, crop=(0, 0) + size,
                       reference=tr.pad_box(box, size, 2), polygon=None)


def _two_objects():
    """A 100 x 80 grey-noise image: a red disc in box (10, 10, 50, 40) and a blue square in
    (60, 30, 90, 70); `owner` marks each object's pixels (0, 1), -1 the rest."""
    rng = np.random.default_rng(0)
    img = rng.integers(60, 120, (80, 100, 3)).astype(np.uint8)
    owner = np.full((80, 100), -1, np.int16)
    disc = np.zeros((80, 100), np.uint8)
    cv2.ellipse(disc, (30, 25), (19, 14), 0, 0, 360, 1, -1)
    img[disc > 0] = RED
    owner[disc > 0] = 0
    img[30:70, 60:90] = BLUE
    owner[30:70, 60:90] = 1
    return img, owner


def test_backdrop_reference_is_the_object_alone_on_one_tone():
    img, owner = _two_objects()
    geom = _geom((100, 80), (10, 10, 50, 40))
    cfg = _cfg(ref_backdrop_fill_min=0.6, ref_backdrop_fill_max=0.8)
    for seed in range(20):
        canvas = tr.backdrop_reference(img, owner == 0, geom, np.random.default_rng(seed), cfg)
        side = canvas.shape[0]
        assert canvas.shape == (side, side, 3)
        assert 0.6 - 0.03 <= 40 / side <= 0.8 + 1e-6  # the box's long side fills its share
        red = (canvas == RED).all(axis=-1)
        assert red.sum() == (owner == 0).sum()  # every object pixel, aspect and size kept
        ys, xs = np.nonzero(red)
        assert np.ptp(xs) + 1 == 39 and np.ptp(ys) + 1 == 29
        rest = canvas[~red]
        assert (rest == rest[0]).all()  # no scene pixel: one plain tone around it
        assert not (canvas == BLUE).all(axis=-1).any()
    # the same draw on an image decoded at half size gives the same picture at half size
    half = cv2.resize(img, (50, 40), interpolation=cv2.INTER_NEAREST)
    small = tr.backdrop_reference(half, owner == 0, geom, np.random.default_rng(3), cfg)
    big = tr.backdrop_reference(img, owner == 0, geom, np.random.default_rng(3), cfg)
    assert abs(small.shape[0] * 2 - big.shape[0]) <= 2
    assert (small == RED).all(axis=-1).sum() > 0.2 * (big == RED).all(axis=-1).sum()
    # a mask with no pixel in the box: None (the caller keeps the usual crop)
    assert tr.backdrop_reference(img, owner == 1, geom, np.random.default_rng(0), cfg) is None


class _Source:
    """One record: `_two_objects` with a tiny third box the box filter drops first, so the
    kept boxes' rows differ from the record's."""

    def __init__(self, owner=True):
        img, own = _two_objects()
        boxes = np.float32([[0, 0, 0.05, 0.05], [0.1, 0.125, 0.5, 0.5], [0.6, 0.375, 0.9, 0.875]])
        if owner:
            own = np.where(own >= 0, own + 1, -1).astype(np.int16)  # rows 1 and 2 of boxes
        self.rec = Record(key="two", boxes=boxes, pixels=img, owner=own if owner else None)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.rec


def _colours(ref):
    red = (np.abs(ref.astype(int) - RED).sum(-1) < 60).mean()
    blue = (np.abs(ref.astype(int) - BLUE).sum(-1) < 60).mean()
    return red, blue


def test_pipeline_backdrop_takes_the_chosen_object_by_its_mask():
    cfg = _cfg(ref_backdrop_prob=1.0, min_box_area=0.02)
    sample = PbeSample(_Source(), cfg)
    seen = set()
    for seed in range(16):
        counts = np.zeros(len(dec.BAD_REASONS), np.int32)
        out = sample.make(0, np.random.default_rng(seed), counts)
        ref = out["reference"]
        assert ref.shape == (cfg.reference_size, cfg.reference_size, 3)
        red, blue = _colours(ref)
        assert (red > 0.1) != (blue > 0.1), (seed, red, blue)  # one object, never the other
        border = np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]])
        obj = (np.abs(border.astype(int) - (RED if red > 0.1 else BLUE)).sum(-1) < 60)
        plain = border[~obj]
        flat = np.abs(plain.astype(int) - np.median(plain, 0)).max(-1) <= 2
        assert flat.mean() > 0.75  # no noise: a backdrop (but where the object's edge blends in)
        seen.add("red" if red > 0.1 else "blue")
    assert seen == {"red", "blue"}
    # off (the default): the padded box as before, its noisy surroundings included
    off = PbeSample(_Source(), _cfg()).make(0, np.random.default_rng(0),
                                            np.zeros(len(dec.BAD_REASONS), np.int32))
    border = off["reference"][0].astype(int)
    assert (np.abs(border - np.median(border, 0)).max(-1) <= 2).mean() < 0.25


def test_default_off_draws_nothing_more():
    """ref_backdrop_prob=0 consumes no random draw: the samples equal those of a config
    without the field (what every config and saved run had before it)."""
    cfg = _cfg()
    old = _cfg()
    for k in ("ref_backdrop_prob", "ref_backdrop_fill_min", "ref_backdrop_fill_max"):
        del old[k]
    for seed in range(4):
        a = PbeSample(_Source(), cfg).make(0, np.random.default_rng(seed), np.zeros(32, np.int32))
        b = PbeSample(_Source(), old).make(0, np.random.default_rng(seed), np.zeros(32, np.int32))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_synthetic_and_folder_masks_and_refusals(tmp_path):
    # synthetic: the records carry the scene's owner map
    cfg = _cfg(ref_backdrop_prob=1.0)
    cfg.synthetic_style = "identity"
    src = make_source(cfg)
    rec = src[0]
    assert rec.owner.shape == rec.pixels.shape[:2] and rec.owner.max() == len(rec.boxes) - 1
    PbeSample(src, cfg).make(0, np.random.default_rng(0), np.zeros(32, np.int32))
    # folder with NAME_mask.png: the mask cuts the object out
    img, owner = _two_objects()
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(np.where(owner == 1, 255, 0).astype(np.uint8)).save(d / "a_mask.png")
    cfg = _cfg(ref_backdrop_prob=1.0, source="folder", images_dir=str(d))
    out = PbeSample(make_source(cfg), cfg).make(0, np.random.default_rng(0), np.zeros(32, np.int32))
    red, blue = _colours(out["reference"])
    assert blue > 0.1 and red == 0
    # sources without masks: refused, naming the field, at source build and by validate
    (d / "boxes.csv").write_text("image,x0,y0,x1,y1\na.png,60,30,90,70\n")
    with pytest.raises(ValueError, match="ref_backdrop_prob=1.0 needs object masks, but .*boxes.csv"):
        make_source(cfg)
    os.remove(d / "boxes.csv")
    cfg.source = "coco"
    with pytest.raises(ValueError, match=r"ref_backdrop_prob=1.0 needs object masks.*'coco'"):
        make_source(cfg)
    c = tiny_config(**{"data.ref_backdrop_prob": 0.5, "data.source": "openimages"})
    assert any(p.startswith("config.data.ref_backdrop_prob=0.5") and "'openimages'" in p
               for p in problems(c))
    c = tiny_config(**{"data.ref_backdrop_fill_min": 0.9, "data.ref_backdrop_fill_max": 0.5})
    assert any("ref_backdrop_fill_min=0.9 > config.data.ref_backdrop_fill_max" in p for p in problems(c))
    assert not problems(tiny_config(**{"data.ref_backdrop_prob": 0.5}))


def test_only_the_identity_demo_turns_it_on():
    assert tiny_config("demo,scenes=identity", small_model=False).data.ref_backdrop_prob == 0.3
    for arg in ("demo", "sd15", "sd21"):
        assert tiny_config(arg, small_model=False).data.ref_backdrop_prob == 0.0
