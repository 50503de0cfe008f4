"""The original (LDM) checkpoint layout and the paper's SD initialisation.

LDM: our key maps turn the tiny diffusers pipeline into an LDM-layout dict; diffusers' own
converters (`convert_from_ckpt`) turn that dict back into the original diffusers tensors, which
checks the maps independently; our loader reads the `model.ckpt` to the same weights.

SD init: a tiny "SD" (4-channel UNet, VAE, text encoder) + a tiny transformers CLIPModel give a
9-channel UNet whose conv_in channels 0-3 are SD's and 4-8 zero, the CLIP vision tower's
weights, a fresh mapper, and a report naming the ignored text tower.
"""
import os

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion import convert_from_ckpt

from pbe_jax.convert import ldm
from pbe_jax.convert.load import load_pipeline
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.unet import UNetConfig
from pbe_jax.models.vae import VAEConfig
from tests.helpers import randomize_fan_in
from tests.test_weights_diffusers import (
    CLIP,
    UNET,
    VAE,
    assert_placed,
    assert_state_dicts_equal,
    model_configs,
    numpy_sd,
    ours_vs_torch,
    replicated_place,
    tiny_pipeline,
)

# Non-weight entries of a LatentDiffusion checkpoint, which the loader must skip and report.
BUFFERS = {"betas": np.linspace(1e-4, 2e-2, 10, dtype=np.float32),
           "alphas_cumprod": np.ones(10, np.float32), "model_ema.decay": np.float32(0.9999),
           "model_ema.num_updates": np.int32(7),
           "cond_stage_model.transformer.vision_model.embeddings.position_ids": np.arange(5)[None]}


def _ldm_dict(pipe) -> dict:
    """The tiny pipeline's weights in LDM (model.ckpt) layout, built with our inverse maps."""
    return ldm.to_ldm_checkpoint(
        numpy_sd(pipe.unet), numpy_sd(pipe.vae), numpy_sd(pipe.image_encoder),
        UNetConfig.from_dict(dict(pipe.unet.config)), VAEConfig.from_dict(dict(pipe.vae.config)))


def _save_ckpt(sd: dict, path: str) -> str:
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
    return path


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=20)


def test_ldm_layout_matches_diffusers_converters(pipe, monkeypatch):
    ckpt = _ldm_dict(pipe)
    assert "model.diffusion_model.input_blocks.0.0.weight" in ckpt
    d = CLIP["hidden_size"]
    assert ckpt["cond_stage_model.mapper.resblocks.0.attn.c_qkv.weight"].shape == (3 * d, d)
    t = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.items()}
    unet = convert_from_ckpt.convert_ldm_unet_checkpoint(dict(t), dict(pipe.unet.config))
    assert_state_dicts_equal({k: v.numpy() for k, v in unet.items()}, numpy_sd(pipe.unet), "unet")
    vae = convert_from_ckpt.convert_ldm_vae_checkpoint(dict(t), dict(pipe.vae.config))
    assert_state_dicts_equal({k: v.numpy() for k, v in vae.items()}, numpy_sd(pipe.vae), "vae")
    # diffusers' PbE converter reads the tower config from the Hub: hand it the tiny one.
    monkeypatch.setattr(convert_from_ckpt.CLIPVisionConfig, "from_pretrained",
                        classmethod(lambda cls, *a, **k: transformers.CLIPVisionConfig(**CLIP)))
    enc = convert_from_ckpt.convert_paint_by_example_checkpoint(dict(t))
    assert_state_dicts_equal(numpy_sd(enc), numpy_sd(pipe.image_encoder), "image_encoder")


def test_sd_structured_maps_match_diffusers_converters():
    """The released model's layout (4 levels, 2 resnets per level, cross-attention in the first 3
    down / last 3 up levels) at small widths: diffusers' converters invert our maps, and the
    key names are those of the released SD / PbE checkpoints."""
    n = 4
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, in_channels=9,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=8,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(4, 8, 16, 16), layers_per_block=2, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n)
    u_sd, v_sd = numpy_sd(unet), numpy_sd(vae)
    u_ldm = ldm.unet_to_ldm(u_sd, UNetConfig.from_dict(dict(unet.config)))
    v_ldm = ldm.vae_to_ldm(v_sd, VAEConfig.from_dict(dict(vae.config)))
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight",
                "input_blocks.11.0.out_layers.3.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "out.2.weight"):
        assert key in u_ldm, key
    for key in ("decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.proj_out.weight"):
        assert key in v_ldm, key
    t = {ldm.UNET_PREFIX + k: torch.from_numpy(v) for k, v in u_ldm.items()}
    t.update({ldm.VAE_PREFIX + k: torch.from_numpy(v) for k, v in v_ldm.items()})
    back = convert_from_ckpt.convert_ldm_unet_checkpoint(dict(t), dict(unet.config))
    assert_state_dicts_equal({k: v.numpy() for k, v in back.items()}, u_sd, "unet")
    back = convert_from_ckpt.convert_ldm_vae_checkpoint(dict(t), dict(vae.config))
    assert_state_dicts_equal({k: v.numpy() for k, v in back.items()}, v_sd, "vae")


def test_load_ldm_ckpt(pipe, tmp_path):
    ckpt = {**_ldm_dict(pipe), **BUFFERS}
    path = _save_ckpt(ckpt, str(tmp_path / "model.ckpt"))
    model, report = load_pipeline("ldm", path, model_config=model_configs(), return_report=True)
    for comp in ("unet", "vae", "image_encoder"):
        ours_vs_torch(model, pipe, comp)
    ignored = {k for keys in report.ignored.values() for k in keys}
    assert set(BUFFERS) <= ignored, sorted(set(BUFFERS) - ignored)
    assert any("noise-schedule" in r and "betas" in keys for r, keys in report.ignored.items())


def test_ldm_errors_name_ldm_keys(pipe, tmp_path):
    ckpt = _ldm_dict(pipe)
    gone = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    bad = {k: v for k, v in ckpt.items() if k != gone}
    bad["model.diffusion_model.input_blocks.9.0.op.weight"] = np.zeros((1,), np.float32)
    path = _save_ckpt(bad, str(tmp_path / "unexpected.ckpt"))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys.*input_blocks\.9\.0\.op\.weight"):
        load_pipeline("ldm", path, model_config=model_configs())
    del bad["model.diffusion_model.input_blocks.9.0.op.weight"]
    path = _save_ckpt(bad, str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointMismatchError) as e:
        load_pipeline("ldm", path, model_config=model_configs())
    assert f"{gone} (unet.down_blocks.0.resnets.0.conv1.weight)" in str(e.value)


def test_ldm_use_ema(pipe, tmp_path):
    ckpt = _ldm_dict(pipe)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v * 2 for k, v in ckpt.items()
           if k.startswith(ldm.UNET_PREFIX)}
    path = _save_ckpt({**ckpt, **ema}, str(tmp_path / "ema.ckpt"))
    model, report = load_pipeline("ldm", path, model_config=model_configs(), use_ema=True,
                                  return_report=True)
    want = {k: v * 2 for k, v in numpy_sd(pipe.unet).items()}
    assert_state_dicts_equal(model.unet.torch_state_dict(), want, "unet (EMA)")
    raw = [k for r, keys in report.ignored.items() if r.startswith("raw (non-EMA)") for k in keys]
    assert sorted(raw) == sorted(k for k in ckpt if k.startswith(ldm.UNET_PREFIX))


# -------------------------------------------------------------------------------- SD init


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """(SD diffusers dir, SD original .ckpt, CLIP dir, sd unet, sd vae, CLIPModel)."""
    root = tmp_path_factory.mktemp("sd_init")
    unet = UNet2DConditionModel(**{**UNET, "in_channels": 4})
    vae = AutoencoderKL(**VAE)
    text_cfg = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=50, max_position_embeddings=8)
    text = transformers.CLIPTextModel(text_cfg)
    vision = {k: v for k, v in CLIP.items() if k != "projection_dim"}
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text_cfg.to_dict(), vision_config=vision, projection_dim=10))
    for i, m in enumerate((unet, vae, text, clip)):
        randomize_fan_in(m, 30 + i)
    sd_dir = root / "sd"
    unet.save_pretrained(sd_dir / "unet")
    vae.save_pretrained(sd_dir / "vae")
    text.save_pretrained(sd_dir / "text_encoder")
    clip_dir = root / "clip"
    clip.save_pretrained(clip_dir)
    ckpt = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(
        numpy_sd(unet), UNetConfig.from_dict(dict(unet.config))).items()}
    ckpt.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(
        numpy_sd(vae), VAEConfig.from_dict(dict(vae.config))).items()})
    # the original SD checkpoint's spelling of the text tower (transformers 5 drops `text_model.`)
    ckpt.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                 for k, v in numpy_sd(text).items()})
    ckpt.update(BUFFERS)
    ckpt_path = _save_ckpt(ckpt, str(root / "sd-v1-tiny.ckpt"))
    return str(sd_dir), ckpt_path, str(clip_dir), unet, vae, clip


def _check_sd_init(model, report, unet, vae, clip):
    ref = numpy_sd(unet)
    ours = model.unet.torch_state_dict()
    w = ours.pop("conv_in.weight")
    assert w.shape == (UNET["block_out_channels"][0], 9, 3, 3)
    np.testing.assert_array_equal(w[:, :4], ref.pop("conv_in.weight"))  # noisy latent: SD's
    np.testing.assert_array_equal(w[:, 4:], 0)  # masked-image latent + mask: zero
    assert_state_dicts_equal(ours, ref, "unet (without conv_in.weight)")
    assert_state_dicts_equal(model.vae.torch_state_dict(), numpy_sd(vae), "vae")
    enc = model.image_encoder.torch_state_dict()
    tower = {k: v for k, v in numpy_sd(clip).items() if k.startswith("vision_model.")}
    assert_state_dicts_equal({k[len("model."):]: v for k, v in enc.items() if k.startswith("model.")},
                             tower, "CLIP vision tower")
    fresh = sorted(k[len("image_encoder."):] for k in
                   report.initialised["random init (trained from scratch in the paper)"])
    assert fresh == sorted(k for k in enc if not k.startswith("model.")), fresh
    assert np.abs(enc["mapper.blocks.0.attn1.to_q.weight"]).max() > 0
    assert enc["uncond_vector"].shape == (1, 1, UNET["cross_attention_dim"])
    assert 0.3 < float(np.std(enc["uncond_vector"])) < 2.0  # a normal draw, not zeros or ones
    text_reason = [r for r in report.ignored if r.startswith("Stable Diffusion's CLIP text tower")]
    assert text_reason, sorted(report.ignored)
    clip_unused = [k for r, keys in report.ignored.items() if r.startswith("parts of the CLIP") for k in keys]
    assert any(k.endswith(":text_model.embeddings.token_embedding.weight") for k in clip_unused)
    assert any(k.endswith(":logit_scale") for k in clip_unused)
    return text_reason


def test_sd_init_from_diffusers_dirs(sd_parts):
    sd_dir, _, clip_dir, unet, vae, clip = sd_parts
    seen = []
    place, sharding = replicated_place(seen)
    model, report = load_pipeline("sd-init", sd_dir, clip=clip_dir, model_config=model_configs(),
                                  place=place, seed=3, return_report=True)
    reasons = _check_sd_init(model, report, unet, vae, clip)
    assert any(k.endswith("/text_encoder/") for r in reasons for k in report.ignored[r])
    assert_placed(model, seen, sharding)  # the fresh mapper too


def test_sd_init_from_original_ckpt(sd_parts):
    _, ckpt, clip_dir, unet, vae, clip = sd_parts
    model, report = load_pipeline("sd-init", ckpt, clip=clip_dir, model_config=model_configs(), seed=3,
                                  return_report=True)
    reasons = _check_sd_init(model, report, unet, vae, clip)
    text_keys = [k for r in reasons for k in report.ignored[r]]
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in text_keys
    assert os.path.basename(ckpt) in report.summary()
