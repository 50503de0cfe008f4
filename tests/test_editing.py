"""Editing for people: crop around the mask (`mask_crop_padding`) on a large photo, in the library
call and the batch loop; diffusers' keyword names (`image=`, `mask_image=`, `example_image=`);
the `--what=crop` benchmark rows."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from pbe_jax import batch_edit, inference
from pbe_jax.benchmarks import crop as crop_bench
from pbe_jax.benchmarks.model import build
from pbe_jax.benchmarks.sizes import get_size
from pbe_jax.inference import crop_window
from pbe_jax.pipeline import PaintByExample

RES = 64  # the demo architecture: UNet sample_size 16 x VAE factor 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_model"))
    build(get_size("tiny"), export_dir=d)  # random weights, host init
    return PaintByExample.from_pretrained(d)


def _photo(h, w, seed=0):
    """A smooth uint8 photo [H, W, 3] (upsampled random colours)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)


def _ref(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (50, 40, 3), np.uint8)


@pytest.fixture
def edit_inputs(monkeypatch):
    """Records the image batch shape of every call of the jitted edit (via `run_edit`)."""
    shapes = []
    real = inference.run_edit

    def spy(pipe, inputs, **kw):
        shapes.append(inputs.image.shape)
        return real(pipe, inputs, **kw)

    monkeypatch.setattr(inference, "run_edit", spy)
    monkeypatch.setattr(batch_edit, "run_edit", spy)
    return shapes


def test_model_resolution(pipe):
    assert inference.model_resolution(pipe) == (RES, RES)
    assert inference.larger_than_model(pipe, (RES, RES + 1))
    assert not inference.larger_than_model(pipe, (RES, RES))


def test_crop_window_geometry():
    m = np.zeros((1200, 1600), bool)
    m[500:540, 700:760] = True  # 60 x 40 px
    x0, y0, x1, y1 = crop_window(m, 32, (RES, RES))
    assert (x0, x1) == (700 - 32, 760 + 32)  # the box grown by the padding ...
    assert y1 - y0 == x1 - x0 and y0 <= 500 - 32 and y1 >= 540 + 32  # ... and to a square
    # at a border the padding is cut (as diffusers'), the aspect kept
    m2 = np.zeros((300, 400), bool)
    m2[0:10, 390:400] = True
    assert crop_window(m2, 8, (RES, RES)) == (382, 0, 400, 18)
    # a wide window grows in height about its centre, shifted inside the image
    m2[:] = False
    m2[290:300, 100:200] = True
    assert crop_window(m2, 0, (RES, RES)) == (100, 200, 200, 300)
    # a mask taller than the image is wide cannot have a square window: it takes the whole width
    m3 = np.zeros((200, 100), bool)
    m3[10:190, 40:60] = True
    assert crop_window(m3, 4, (RES, RES)) == (0, 6, 100, 194)
    # a non-square target: the window takes its aspect
    x0, y0, x1, y1 = crop_window(m, 0, (32, 64))
    assert (x1 - x0) == 2 * (y1 - y0) and (y0, y1) == (500, 540)


@pytest.mark.slow
def test_crop_on_a_large_photo(pipe, edit_inputs):
    src, ref = _photo(1200, 1600), _ref()
    mask = np.zeros((1200, 1600), np.uint8)
    mask[500:540, 700:760] = 255  # a small region, white = edit
    out = pipe(src, mask, ref, num_inference_steps=2, mask_crop_padding=32, seed=0)
    assert edit_inputs == [(1, RES, RES, 3)]  # the jitted edit (VAE / UNet) ran at the model's size
    got = np.asarray(out[0])
    assert got.shape == src.shape
    x0, y0, x1, y1 = crop_window(mask > 127, 32, (RES, RES))
    outside = np.ones(mask.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(got[outside], src[outside])  # bit-identical outside the window
    edit = mask > 127
    np.testing.assert_array_equal(got[~edit], src[~edit])  # and outside the mask (feathered paste)
    assert np.abs(got[edit].astype(int) - src[edit]).mean() > 5  # edited inside
    # off by default (diffusers' default): the whole image goes through the model
    edit_inputs.clear()
    pipe(src[480:520, 700:748], mask[480:520, 700:748], ref, num_inference_steps=2)
    assert edit_inputs == [(1, 40, 48, 3)]
    with pytest.raises(ValueError, match="mask_crop_padding must be >= 0"):
        pipe(src, mask, ref, num_inference_steps=2, mask_crop_padding=-1)


def test_batch_loop_crops_large_rows_together(pipe, edit_inputs):
    rows = []
    for i, (h, w) in enumerate(((300, 400), (250, 180), (40, 48))):  # two large, one small
        image = _photo(h, w, seed=i)
        edit = np.zeros((h, w), bool)
        edit[h // 3:h // 3 + 20, w // 3:w // 3 + 16] = True
        rows.append(batch_edit.Row(id=str(i), source="", mask="", reference="", seed=i, image=image,
                                   edit=edit, ref=_ref(i)))
    out = dict((r.id, imgs) for r, imgs in batch_edit.edit_rows(
        pipe, rows, batch_size=4, steps=2, guidance=5.0, scheduler="plms", mask_crop_padding=16))
    assert sorted(edit_inputs) == [(1, 40, 48, 3), (2, RES, RES, 3)]  # large rows: one batch at 64
    for r in rows:
        (img,) = out[r.id]
        assert img.shape == r.image.shape
        if r.id != "2":
            np.testing.assert_array_equal(img[~r.edit], r.image[~r.edit])


def test_diffusers_keyword_names(pipe):  # 40 x 48, 2 steps: the shape the tests above compiled
    src, ref = _photo(40, 48), _ref()
    mask = np.zeros((40, 48), np.uint8)
    mask[8:24, 12:32] = 255
    kw = dict(num_inference_steps=2, seed=5, output_type="np")
    ours = pipe(src, mask, ref, **kw)
    theirs = pipe(image=src, mask_image=mask, example_image=ref, **kw)
    np.testing.assert_array_equal(theirs, ours)
    np.testing.assert_array_equal(pipe(source=src, mask_image=mask, reference=ref, **kw), ours)
    with pytest.raises(TypeError, match="both source= and image="):
        pipe(src, mask, ref, image=src, **kw)
    with pytest.raises(TypeError, match="missing the reference image.*example_image="):
        pipe(image=src, mask_image=mask, **kw)


@pytest.mark.slow
def test_crop_benchmark_rows():
    rows = {r.name: r for r in crop_bench.run(get_size("tiny"), source=(80, 100), padding=8, steps=2,
                                              reps=1, warmup=1)}
    name = "crop/tiny/100x80"
    assert set(rows) == {f"{name}/{k}" for k in ("call_time", "edit_pixels", "flops", "temp_memory")}
    assert rows[f"{name}/edit_pixels"].ours == RES * RES
    assert rows[f"{name}/edit_pixels"].reference == 80 * 104  # padded to the factor 8
    assert rows[f"{name}/call_time"].reference is not None  # the whole image fits: timed too
    assert rows[f"{name}/flops"].ratio < 1 and rows[f"{name}/temp_memory"].ratio < 1
    assert all(math.isfinite(r.ours) and r.ours > 0 for r in rows.values())
    Image.fromarray(crop_bench.inputs(100, 80, 20)[0])  # the synthetic photo is a valid image
