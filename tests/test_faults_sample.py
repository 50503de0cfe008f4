"""The batch CLI and the loaders under faults (issue 15): ids that leave --out, cut outputs,
oversize and bomb sources, a batch that fails on the device, other settings on a rerun, a
read-only --out, manifest type errors, 16-bit masks, a 4-channel UNet, a corrupt newest
training checkpoint read by from_pretrained / convert."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from flax import nnx
from PIL import Image

from pbe_jax import batch_edit
from pbe_jax.batch_edit import Row, check_settings, read_manifest, write_results, write_settings
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.inference import load_edit_mask
from pbe_jax.models.paint_by_example import PaintByExampleModel
from pbe_jax.pipeline import PaintByExample
from tests.test_faults_data import png_bomb
from tests.test_faults_train import corrupt
from tests.test_sample import H, W, _images
from tests.test_weights_diffusers import UNET, model_configs, tiny_pipeline
from tests.test_weights_orbax import _expected, _train_checkpoint
from tests.train_utils import REPO, subprocess_env

EDIT = dict(batch_size=4, steps=2, guidance=5.0, scheduler="ddim", num_samples=1, paste_back=False,
            reference_preprocess="squash")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pbe"))
    tiny_pipeline(seed=5).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    return PaintByExample.from_pretrained(model_dir)


@pytest.fixture
def files(tmp_path):
    """Source / mask / reference files of one edit, in tmp_path/in."""
    d = tmp_path / "in"
    d.mkdir()
    for name, img in zip(("s.png", "m.png", "r.png"), _images()):
        img.save(d / name)
    return d


def row(files, rid: str, seed: int = 0, source: str = "s.png") -> Row:
    return Row(id=rid, source=str(files / source), mask=str(files / "m.png"),
               reference=str(files / "r.png"), seed=seed)


def test_ids_that_leave_out_fail_alone_and_the_other_rows_are_written(pipe, files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "escaped_0.png"
    Image.new("RGB", (4, 4)).save(outside)  # used to make the escaping row count as done
    before = sorted(os.listdir(tmp_path))
    bad = ["../escaped", str(tmp_path / "abs"), "sub/dir", "back\\slash"]
    rows = [row(files, "a", 1)] + [row(files, b) for b in bad] + [row(files, "b", 2)]
    written, failed = write_results(pipe, rows, str(out), **EDIT)
    assert written == 2 and sorted(failed) == sorted(bad), failed
    assert all("not a plain file name" in failed[b] for b in bad), failed
    assert sorted(os.listdir(out)) == ["a_0.png", "b_0.png"]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written next to --out


def test_cut_output_is_redone_on_rerun(pipe, files, tmp_path):
    out = tmp_path / "out"
    rows = lambda: [row(files, "a", 1), row(files, "b", 2)]  # noqa: E731
    assert write_results(pipe, rows(), str(out), **EDIT) == (2, {})
    a, b = out / "a_0.png", out / "b_0.png"
    whole, b_mtime = a.read_bytes(), os.path.getmtime(b)
    a.write_bytes(whole[: len(whole) // 2])  # a kill or a full disk mid-write (before issue 15)
    assert write_results(pipe, rows(), str(out), **EDIT) == (1, {})  # only the cut one is redone
    redone, first = (np.asarray(Image.open(f), np.int16) for f in (a, io.BytesIO(whole)))
    assert np.abs(redone - first).max() <= 1  # the same edit (batch of 1 instead of 2)
    assert os.path.getmtime(b) == b_mtime
    assert sorted(os.listdir(out)) == ["a_0.png", "b_0.png"]  # no temporary file left


def test_oversize_and_bomb_rows_fail_alone_with_a_message(pipe, files, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (2 * H, 2 * W, 3), np.uint8)).save(files / "big.png")
    m = np.zeros((2 * H, 2 * W), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(files / "big_mask.png")
    (files / "bomb.png").write_bytes(png_bomb(14000, 14000))
    big = row(files, "big", source="big.png")
    big.mask = str(files / "big_mask.png")
    rows = [big, row(files, "bomb", source="bomb.png"), row(files, "next", 3)]
    out = tmp_path / "out"
    written, failed = write_results(pipe, rows, str(out), max_pixels=H * W, **EDIT)
    assert written == 1 and sorted(failed) == ["big", "bomb"], failed
    assert f"over max_pixels={H * W:,}" in failed["big"] and "64x64" in failed["big"], failed["big"]
    assert "too large to decode" in failed["bomb"], failed["bomb"]
    assert sorted(os.listdir(out)) == ["next_0.png"]


def test_a_batch_that_fails_on_the_device_is_retried_row_by_row(pipe, files, tmp_path, monkeypatch):
    real = batch_edit.run_edit

    def run_edit(p, inputs, **kw):
        if 666 in inputs.seeds:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate (injected)")
        return real(p, inputs, **kw)

    monkeypatch.setattr(batch_edit, "run_edit", run_edit)
    alone = tmp_path / "alone"
    write_results(pipe, [row(files, "a", 1)], str(alone), **EDIT)
    out = tmp_path / "out"
    rows = [row(files, "a", 1), row(files, "poison", 666), row(files, "b", 2)]
    written, failed = write_results(pipe, rows, str(out), **EDIT)
    assert written == 2 and list(failed) == ["poison"], failed
    assert "RESOURCE_EXHAUSTED" in failed["poison"]
    assert sorted(os.listdir(out)) == ["a_0.png", "b_0.png"]
    # a's result does not depend on its batch-mates, nor on being retried alone
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a_0.png")),
                                  np.asarray(Image.open(alone / "a_0.png")))


def _sample(args, model_dir):
    env = subprocess_env(1)
    return subprocess.run([sys.executable, "-m", "pbe_jax.sample", f"--model={model_dir}", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_rerun_with_other_settings_or_unwritable_out_refuses_before_any_compute(files, model_dir, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f'{{"id": "a", "source": "{files}/s.png", "mask": "{files}/m.png", '
                        f'"reference": "{files}/r.png"}}\n')
    out = tmp_path / "out"
    old = {"model": os.path.abspath(model_dir), "steps": 3, "guidance": 5.0, "scheduler": "plms",
           "seed": 0, "num_samples": 1, "paste_back": False, "reference_preprocess": "squash",
           "dtype": "fp32", "mask_crop_padding": 32}
    write_settings(str(out), old)
    p = _sample([f"--manifest={manifest}", f"--out={out}", "--steps=4", "--scheduler=ddim"], model_dir)
    assert p.returncode != 0
    assert "other settings (steps: 3 -> 4, scheduler: 'plms' -> 'ddim')" in p.stderr, p.stderr[-2000:]
    assert "--overwrite" in p.stderr and os.listdir(out) == ["settings.json"]
    check_settings(str(out), {**old, "steps": 4}, overwrite=True)  # --overwrite: accepted
    check_settings(str(out), old)  # the same settings: resumes
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = _sample([f"--manifest={manifest}", f"--out={blocker}/out"], model_dir)
    assert p.returncode != 0 and "--out" in p.stderr and "cannot write there" in p.stderr, p.stderr[-2000:]


def test_manifest_errors_name_the_file_line_and_field(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,source,mask,reference,seed\na,s.png,m.png,r.png,1\nb,s.png,m.png,r.png,abc\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: field 'seed' is 'abc', not an integer"):
        read_manifest(str(csv_path), 0)
    csv_path.write_text('id,source,mask,reference\na,s.png,m.png,r.png\nb,"s.png,m.png,r.png\n'
                        "c,s.png,m.png,r.png\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: malformed CSV row"):
        read_manifest(str(csv_path), 0)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join('{"id": "%s", "source": "s", "mask": "m", "reference": "r"}' % i
                               for i in ("x", "y", "x", "z", "y")))
    with pytest.raises(ValueError, match=r"duplicate ids \['x', 'y'\]"):
        read_manifest(str(jsonl), 0)
    jsonl.write_text('{"id": "a", "source": "s", "mask": "m", "reference": "r", "seed": [1]}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: field 'seed' is \[1\], not an integer"):
        read_manifest(str(jsonl), 0)


def test_16bit_mask_grey_region_is_not_edited(pipe, files, tmp_path):
    """A 16-bit mask: white (65535) = edit, 30% grey (19660) = keep. Clipping to 8 bits made
    the grey region white."""
    m16 = np.zeros((H, W), np.uint16)
    m16[8:24, 4:12] = 19660  # 30% grey
    m16[8:24, 12:20] = 65535
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode == "I;16"
    grey, white = np.zeros((H, W), bool), np.zeros((H, W), bool)
    grey[8:24, 4:12] = True
    white[8:24, 12:20] = True
    for mask in (str(tmp_path / "m16.png"), m16, m16.astype(np.float32) / 65535):
        np.testing.assert_array_equal(load_edit_mask(mask), white)
    src = np.asarray(Image.open(files / "s.png"))
    out = np.asarray(pipe(str(files / "s.png"), str(tmp_path / "m16.png"), str(files / "r.png"),
                          num_inference_steps=2, scheduler="ddim", paste_back=True)[0])
    np.testing.assert_array_equal(out[grey], src[grey])  # kept
    assert np.abs(out[white].astype(int) - src[white]).mean() > 5  # edited


def test_4_channel_unet_is_refused_at_load(pipe, model_dir, tmp_path):
    d = tmp_path / "t2i"
    shutil.copytree(model_dir, d)
    shutil.rmtree(d / "unet")
    UNet2DConditionModel(**{**UNET, "in_channels": 4}).save_pretrained(d / "unet")
    message = r"4 input channels, not 9 .* not a Paint-by-Example UNet.*sd-init"
    with pytest.raises(ValueError, match=message):
        PaintByExample.from_pretrained(str(d))
    assert convert_main(["--from", "diffusers", "--src", str(d), "--to", "orbax", "--dst",
                         str(tmp_path / "never"), "--no-progress"]) == 1
    configs = model_configs()
    configs["unet"]["in_channels"] = 4
    with pytest.raises(ValueError, match=message):  # a training config: refused at the same place
        nnx.eval_shape(lambda: PaintByExampleModel.from_model_config(
            {**configs, "scheduler": pipe.scheduler_config}))


def test_corrupt_newest_training_checkpoint_loads_the_previous_one(pipe, tmp_path):
    """from_pretrained and convert --from orbax fall back past a corrupt newest step (they failed
    with OUT_OF_RANGE) through the one fallback training uses, which moves it aside."""
    want3 = {k: v * np.float32(3.0) for k, v in _expected(pipe, ema=False)["unet"].items()}
    for how in ("from_pretrained", "convert"):
        wd = tmp_path / how
        _train_checkpoint(pipe, str(wd))  # steps 3 and 7
        corrupt(wd / "checkpoints" / "7")
        if how == "from_pretrained":
            loaded, report = PaintByExample.from_pretrained(str(wd), use_ema=False, return_report=True)
            assert any("step 3" in n for n in report.notes), report.notes
            got = loaded.unet.torch_state_dict()
            assert all(np.array_equal(got[k], want3[k]) for k in want3)
        else:
            assert convert_main(["--from", "orbax", "--src", str(wd), "--to", "orbax", "--dst",
                                 str(tmp_path / "export"), "--no-progress"]) == 0
        names = os.listdir(wd / "checkpoints")
        assert "3" in names and "7" not in names and any(n.startswith("7.corrupt-") for n in names)
