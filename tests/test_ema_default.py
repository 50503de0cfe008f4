"""EMA weights by default, and one flag spelling everywhere (issue 32).

- `PaintByExample.from_pretrained(workdir)` of a run that kept EMA params returns them and logs
  one line saying so; `use_ema=False` returns the raw ones;
- `--use_ema` and `--use-ema` both parse on sample / evaluate / demo / convert (sample and
  evaluate run as subprocesses with `from_pretrained` stubbed, as tests/test_cli_weights_flags.py);
- the shared flags (`pbe_jax.cli_flags`) carry the library's defaults (`pbe_jax.defaults`).
"""
import inspect
import logging
import os
import subprocess
import sys

import pytest
from absl import flags

from pbe_jax import cli_flags
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.convert.safetensors_io import read_safetensors
from pbe_jax.defaults import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from pbe_jax.inference import edit
from pbe_jax.pipeline import PaintByExample
from tests.test_cli_weights_flags import manifest, run_each  # noqa: F401 (a fixture)
from tests.test_weights_diffusers import assert_state_dicts_equal, tiny_pipeline
from tests.test_weights_orbax import _expected, _train_checkpoint
from tests.train_utils import REPO, subprocess_env


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("ema_src"))
    tiny_pipeline(seed=41).save_pretrained(src)  # a diffusers pipeline
    return PaintByExample.from_pretrained(src)


@pytest.fixture(scope="module")
def run_with_ema(ours, tmp_path_factory):
    model = ours
    workdir = str(tmp_path_factory.mktemp("ema_run") / "run")
    _train_checkpoint(model, workdir)  # step 7: EMA = raw * 0.5
    return model, workdir


def test_from_pretrained_loads_ema_by_default(run_with_ema, caplog):
    model, workdir = run_with_ema
    with caplog.at_level(logging.INFO, logger="pbe_jax"):
        pipe, report = PaintByExample.from_pretrained(workdir, return_report=True)
    assert report.ema
    said = [r.getMessage() for r in caplog.records if "params of" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("loaded the EMA params") and "use_ema=False" in said[0]
    assert_state_dicts_equal(pipe.unet.torch_state_dict(), _expected(model, ema=True)["unet"], "unet (EMA)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pbe_jax"):
        raw = PaintByExample.from_pretrained(workdir, use_ema=False)
    assert any(r.getMessage().startswith("loaded the raw params") for r in caplog.records)
    assert_state_dicts_equal(raw.unet.torch_state_dict(), _expected(model, ema=False)["unet"], "unet (raw)")


def test_convert_takes_ema_by_default_and_both_spellings(run_with_ema, tmp_path):
    model, workdir = run_with_ema
    want_ema = _expected(model, ema=True)["unet"]
    for i, extra in enumerate(([], ["--use_ema"], ["--use-ema"])):
        out = str(tmp_path / f"export{i}")
        assert convert_main(["--from", "orbax", "--src", workdir, *extra, "--to", "diffusers", "--dst", out,
                             "--no-progress"]) == 0
        got = read_safetensors(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
        assert_state_dicts_equal(got, want_ema, f"unet {extra}")
        with open(os.path.join(out, "README.md")) as f:
            assert "(EMA weights)" in f.read()  # the model card says what was exported
    out = str(tmp_path / "raw")
    assert convert_main(["--from", "orbax", "--src", workdir, "--nouse-ema", "--to", "diffusers", "--dst", out,
                         "--no-progress"]) == 0
    got = read_safetensors(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert_state_dicts_equal(got, _expected(model, ema=False)["unet"], "unet raw")


@pytest.mark.parametrize("cli", ["sample", "evaluate"])
def test_sample_and_evaluate_take_both_spellings(cli, manifest, tmp_path):  # noqa: F811
    where = ([f"--manifest={manifest}", f"--out={tmp_path / 'out'}"] if cli == "sample"
             else [f"--bench={manifest}", f"--out={tmp_path / 'ev'}"])
    # --use_ema: test_cli_weights_flags
    got = run_each(cli, [["--model=runs/mine", *where, spelling] for spelling in ("--use-ema", "--nouse-ema")])
    assert [(g["path"], g["use_ema"]) for g in got] == [("runs/mine", True), ("runs/mine", False)], got


DEMO = """
import sys
from absl import flags
import pbe_jax.demo
from pbe_jax import cli_flags
for spelling in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(cli_flags.dashes_to_underscores(["demo", "--model=x"] + ([spelling] if spelling != "-" else [])))
    print("USE_EMA", spelling, flags.FLAGS.use_ema)
"""


def test_demo_takes_both_spellings():
    r = subprocess.run([sys.executable, "-c", DEMO, "--use_ema", "--use-ema", "--nouse-ema", "-"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("USE_EMA")]
    assert got == [["--use_ema", "True"], ["--use-ema", "True"], ["--nouse-ema", "False"], ["-", "None"]], r.stdout


def test_dashes_to_underscores():
    fv = flags.FlagValues()
    cli_flags.define_model_flags(flag_values=fv)
    flags.DEFINE_integer("mask_crop_padding", 32, "", flag_values=fv)
    got = cli_flags.dashes_to_underscores(["prog", "--mask-crop-padding=4", "--nouse-ema", "--steps", "3",
                                           "--not-a-flag", "--", "--mask-crop-padding"], fv)
    assert got == ["prog", "--mask_crop_padding=4", "--nouse_ema", "--steps", "3", "--not-a-flag", "--",
                   "--mask-crop-padding"]
    fv([a for a in got if a != "--not-a-flag"])
    assert fv.mask_crop_padding == 4 and fv.use_ema is False and fv.steps == 3


def test_defaults_in_one_place():
    fv = flags.FlagValues()
    cli_flags.define_model_flags(flag_values=fv)
    assert fv["steps"].default == NUM_INFERENCE_STEPS and fv["guidance"].default == GUIDANCE_SCALE
    sig = inspect.signature(edit).parameters
    assert sig["num_inference_steps"].default == NUM_INFERENCE_STEPS
    assert sig["guidance_scale"].default == GUIDANCE_SCALE
    for mod in ("sample", "evaluate", "demo", "bench", "webdemo", "inference", "pipeline"):
        with open(os.path.join(REPO, "pbe_jax", f"{mod}.py")) as f:
            src = f.read()
        for literal in ('"steps", 50', '"guidance", 5.0', "steps: int = 50", "guidance: float = 5.0",
                        "num_inference_steps: int = 50", "guidance_scale: float = 5.0"):
            assert literal not in src, (mod, literal)


def test_repr_is_short(ours):
    text = repr(ours)
    assert len(text.splitlines()) < 10 and "unet" in text and "params" in text, text


def test_from_pretrained_single_file(ours, tmp_path):
    pipe = ours
    path = pipe.save_pretrained(str(tmp_path / "model.safetensors"), format="ldm")
    for load in (PaintByExample.from_pretrained, PaintByExample.from_single_file):
        got = load(path)
        assert_state_dicts_equal(got.unet.torch_state_dict(), pipe.unet.torch_state_dict(), "unet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        PaintByExample.from_single_file(str(tmp_path / "absent.safetensors"))
