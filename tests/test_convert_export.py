"""`python -m pbe_jax.convert` exports: `--to ldm` (the original single-file layout, for tools
that load single-file checkpoints) round trips bitwise through our `--from ldm` and loads in
diffusers' single-file loader where diffusers supports the component; `--push_to_hub --dry_run`
lists what would be uploaded; `--max_shard_size` shards."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from pbe_jax.convert import ldm
from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.pipeline import PaintByExample
from tests.test_weights_diffusers import assert_export_equals, assert_state_dicts_equal, numpy_sd, tiny_pipeline

NO_PROGRESS = "--no-progress"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch pipeline, its diffusers dir, our orbax params checkpoint of it)."""
    pipe = tiny_pipeline(seed=50)
    root = tmp_path_factory.mktemp("export")
    src = str(root / "diffusers")
    pipe.save_pretrained(src)
    orbax = PaintByExample.from_pretrained(src).save_pretrained(str(root / "orbax"), format="orbax")
    return pipe, src, orbax


def test_to_ldm_roundtrip_is_bitwise(tiny, tmp_path):
    pipe, _, orbax = tiny
    single = str(tmp_path / "pbe.safetensors")
    assert convert_main(["--from", "orbax", "--src", orbax, "--to", "ldm", "--dst", single, NO_PROGRESS]) == 0
    keys = set(stio.open_safetensors(single))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # the original layout's names
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.mapper.resblocks.0.attn.c_qkv.weight" in keys and "learnable_vector" in keys
    # read back with no --model-config: the file carries its (non-released) architecture
    back = str(tmp_path / "back")
    assert convert_main(["--from", "ldm", "--src", single, "--to", "diffusers", "--dst", back, NO_PROGRESS]) == 0
    assert_export_equals(back, pipe)
    with open(os.path.join(back, "scheduler", "scheduler_config.json")) as f, \
            open(os.path.join(orbax, "pbe_config.json")) as g:
        assert json.load(f) == json.load(g)["configs"]["scheduler"]  # the metadata kept it too


def test_to_ldm_ckpt_only_by_name(tiny, tmp_path):
    pipe, src, _ = tiny
    ckpt = str(tmp_path / "model.ckpt")
    assert convert_main(["--from", "diffusers", "--src", src, "--to", "ldm", "--dst", ckpt, "--dtype", "fp16",
                         NO_PROGRESS]) == 0
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    model = PaintByExample.from_pretrained(src)
    parts = (getattr(model, c).torch_state_dict(np.float16) for c in ("unet", "vae", "image_encoder"))
    want = ldm.to_ldm_checkpoint(*parts, model.unet.config, model.vae.config)
    assert_state_dicts_equal({k: v.numpy() for k, v in sd.items()}, want, "model.ckpt")
    # a .ckpt carries no architecture: read back with --model-config
    back = str(tmp_path / "back")
    assert convert_main(["--from", "ldm", "--src", ckpt, "--model-config", src, "--to", "diffusers", "--dst", back,
                         NO_PROGRESS]) == 0
    assert_export_equals(back, tiny_pipeline(seed=50).to(torch.float16), torch_dtype=torch.float16)
    assert convert_main(["--from", "diffusers", "--src", src, "--to", "ldm", "--dst", str(tmp_path / "dir"),
                         NO_PROGRESS]) == 2


def test_diffusers_single_file_loaders(tiny, tmp_path):
    """What diffusers' single-file support covers of a Paint-by-Example LDM file: the UNet and
    the VAE (`from_single_file` with the component config)."""
    pipe, src, _ = tiny
    single = PaintByExample.from_pretrained(src).save_pretrained(str(tmp_path / "pbe.safetensors"), format="ldm")
    for cls, comp in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        loaded = cls.from_single_file(single, config=src, subfolder=comp, local_files_only=True)
        assert_state_dicts_equal(numpy_sd(loaded), numpy_sd(getattr(pipe, comp)), comp)
    # Not covered by diffusers: `PaintByExampleImageEncoder` has no `from_single_file`, and the
    # legacy `convert_paint_by_example_checkpoint` loads the tower with transformers 5 names
    # (no `vision_model.`), so it reads neither the released model.ckpt nor this file.


def test_push_dry_run_and_shards(tiny, tmp_path, capsys):
    _, src, _ = tiny
    out = str(tmp_path / "export")
    assert convert_main(["--from", "diffusers", "--src", src, "--to", "diffusers", "--dst", out,
                         "--max-shard-size", "20000", "--push-to-hub", "me/pbe-tiny", "--dry-run",
                         NO_PROGRESS]) == 0
    printed = capsys.readouterr().out
    assert "would upload" in printed and "https://huggingface.co/me/pbe-tiny (dry run)" in printed
    listed = [line.strip() for line in printed.split("(dry run):")[1].splitlines() if line.strip()]
    on_disk = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert listed == on_disk
    assert "README.md" in listed and "unet/diffusion_pytorch_model.safetensors.index.json" in listed
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "base_model" not in card.split("---")[1]  # a local source names no base model
    assert 'PaintByExample.from_pretrained("me/pbe-tiny")' in card
    assert convert_main(["--from", "diffusers", "--src", src, "--to", "ldm", "--dst", str(tmp_path / "x.safetensors"),
                         "--push_to_hub", "me/x", NO_PROGRESS]) == 2
