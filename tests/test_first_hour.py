"""The first hour without traps (issue 32): a whole-photo edit the model cannot make in
reasonable memory is refused at once (the guard comes from the model's latent size), the
first edit says that it compiles, and orbax's lines that need no action stay quiet."""
import json
import logging
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from pbe_jax.configs.pbe import demo_models
from pbe_jax.convert.model_card import CardInfo, make_model_card
from pbe_jax.convert.safetensors_io import write_safetensors
from pbe_jax.data.pipeline import describe_counts
from pbe_jax.inference import MAX_PIXELS, max_pixels_for
from pbe_jax.models.abstract import eval_shape
from pbe_jax.pipeline import PaintByExample
from pbe_jax.schedulers import pbe_scheduler_config
from tests.test_weights_diffusers import tiny_pipeline
from tests.train_utils import REPO, subprocess_env


@pytest.fixture(scope="module")
def demo_pipe():
    """The demo's architecture (2x VAE, attention on 16 x 16 latents), abstract params: the
    guard runs before any compute."""
    return eval_shape(lambda: PaintByExample.from_model_config(
        {**demo_models().to_dict(), "scheduler": pbe_scheduler_config()}))


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    tiny_pipeline(seed=5).save_pretrained(d)  # a diffusers pipeline
    return PaintByExample.from_pretrained(d)


def test_memory_guard_from_the_latent_size(demo_pipe):
    assert max_pixels_for(demo_pipe) == 192 * 192  # the demo's attention at SD's 768 x 768 token count
    sd = {"vae": {"block_out_channels": (128, 256, 512, 512)},
          "unet": {"down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)}}

    class Cfg:
        def __init__(self, d):
            self.__dict__.update(d)

    class SD:
        vae = Cfg({"config": Cfg(sd["vae"])})
        unet = Cfg({"config": Cfg(sd["unet"])})
    assert max_pixels_for(SD) == MAX_PIXELS  # SD v1 keeps its 768 x 768


def test_demo_model_refuses_a_300x200_whole_photo_within_a_second(demo_pipe):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[80:120, 100:160] = 255
    ref = rng.integers(0, 256, (64, 64, 3), np.uint8)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"300x200 .* over max_pixels=36,864 \(this model's limit.*mask_crop_padding"):
        demo_pipe(src, mask, ref, num_inference_steps=2)
    assert time.perf_counter() - t0 < 1.0


QUIET = """
import sys, tempfile
from absl import logging as absl_logging
absl_logging.set_verbosity(int(sys.argv[1]))
from absl import logging
from pbe_jax.checkpoint import Checkpointer
Checkpointer(tempfile.mkdtemp(), async_save=False).close()  # registers orbax's jax.Array handler
logging.warning("Metadata file does not exist: /run/checkpoints/7/_CHECKPOINT_METADATA")
logging.warning("something else")
"""


def test_orbax_noise_is_filtered_unless_verbose():
    for verbosity, shown in ((0, False), (1, True)):
        r = subprocess.run([sys.executable, "-c", QUIET, str(verbosity)], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        for noise in ("overriding jax.Array", "Metadata file does not exist"):
            assert (noise in r.stderr) is shown, (verbosity, noise, r.stderr[-2000:])
        assert "something else" in r.stderr  # other warnings pass


def test_first_edit_says_it_compiles(tiny_pipe, caplog):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (24, 40, 3), np.uint8)
    mask = np.zeros((24, 40), np.uint8)
    mask[4:12, 8:20] = 255
    with caplog.at_level(logging.INFO, logger="pbe_jax"):
        tiny_pipe(src, mask, src, num_inference_steps=2, output_type="np")
        tiny_pipe(src, mask, src, num_inference_steps=2, output_type="np", seed=3)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("pbe_jax")]
    assert sum(m.startswith("compiling the edit for 1 image(s) of 40x24, 2 steps") for m in said) == 1, said
    assert sum(m.startswith("compiled and ran the first edit in ") for m in said) == 1, said


def test_weight_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "w.safetensors")
        write_safetensors(path, {"a": np.zeros(3, np.float32)})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        write_safetensors(path, {"a": np.zeros(3, np.float32)})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


def test_model_card_names_the_dataset_of_each_metric(tmp_path):
    card = make_model_card(eval_shape(lambda: PaintByExample.from_model_config(
        {**demo_models().to_dict(), "scheduler": pbe_scheduler_config()})),
        CardInfo(metrics={"exemplar_following": 0.8, "vae_psnr": 30.0, "fid": 12.0}, metrics_source="m.jsonl"))
    got = {r.metric_type: r.dataset_name for r in card.data.eval_results}
    assert got["fid"] == "COCOEE"
    assert "synthetic" in got["exemplar_following"] and "synthetic" in got["vae_psnr"]
    assert "| exemplar_following (pbe_jax synthetic palette scenes (held out)) | 0.8 |" in card.text
    assert "| FID | 12 |" in card.text


def _doc_snippet() -> str:
    """The Python block of docs/checkpoints.md's 'Loading an export in diffusers'."""
    with open(os.path.join(REPO, "docs", "checkpoints.md")) as f:
        text = f.read()
    section = text[text.index("## Loading an export in diffusers"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_the_docs_pytorch_snippet_loads_a_demo_style_export(tiny_pipe, tmp_path):
    """The demo's scheduler (DDIM, prediction_type='sample') is what PNDMScheduler rejected."""
    torch = pytest.importorskip("torch")
    export = tiny_pipe.save_pretrained(str(tmp_path / "export"))
    demo_sched = {**pbe_scheduler_config(), "_class_name": "DDIMScheduler", "prediction_type": "sample"}
    with open(os.path.join(export, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(demo_sched, f)  # the demo's noise schedule (configs/pbe.py demo_models)
    code = _doc_snippet()
    assert 'd = "export/"' in code and "PNDMScheduler.from_pretrained" not in code
    scope: dict = {}
    exec(code.replace('d = "export/"', f"d = {export!r}"), scope)  # noqa: S102 (the doc's own code)
    pipe = scope["pipe"]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "sample"
    rng = np.random.default_rng(0)
    from PIL import Image  # noqa: PLC0415
    side = 8 * 2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1)
    src = Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))
    mask = Image.fromarray(np.pad(np.full((side // 2, side // 2), 255, np.uint8), side // 4))
    with torch.no_grad():
        out = pipe(image=src, mask_image=mask, example_image=src, num_inference_steps=2, height=side,
                   width=side, output_type="np").images
    assert out.shape == (1, side, side, 3) and np.isfinite(out).all()


def test_box_filter_drops_are_reported_as_what_they_are():
    got = describe_counts({"no_valid_box": 7, "undecodable": 1})
    assert got.startswith("7 samples whose boxes the box filter (data.min_box_area / max_box_area) dropped")
    assert "undecodable: 1" in got and "bad" not in got
    assert describe_counts({}) == "none"


def test_train_inputs_grid_is_readable():
    from pbe_jax.training.loop import _input_grid  # noqa: PLC0415
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), np.uint8),
             "mask": rng.integers(0, 2, (4, 32, 32, 1), np.uint8) * 255,
             "reference": rng.integers(0, 256, (4, 48, 48, 3), np.uint8)}
    grid = _input_grid(batch)
    assert grid.shape == (96 * 6, 128 * 6, 3)  # 3 rows x 4 samples of 32 px, upscaled 6x (was 96 x 128)
    np.testing.assert_array_equal(grid[::6, ::6], grid[5::6, 5::6])  # whole pixels, not blurred
