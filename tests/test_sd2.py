"""Paint by Example on SD 2.x: `sd-init` from a tiny random SD 2.x-style diffusers repo (UNet
with linear projections, per-block heads and upcast attention; a v_prediction scheduler) plus a
tiny gelu CLIP tower saved by transformers; the export loads in diffusers with its
prediction_type; a tiny SD 2.x-style v-prediction PbE model samples like diffusers'
`PaintByExamplePipeline` (PLMS and DDIM); the sd21 / sd21_768 configs describe those repos; the
paper variants refuse to train on the synthetic default."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PaintByExamplePipeline,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

from pbe_jax.configs import load_config
from pbe_jax.convert.diffusers_io import save_diffusers
from pbe_jax.convert.load import load_pipeline
from pbe_jax.convert.report import check_architecture
from pbe_jax.data.pipeline import make_loader
from pbe_jax.models.paint_by_example import parse_component_configs
from pbe_jax.pipeline import PaintByExample
from tests.test_sample import H, W, _diffusers, _images
from tests.helpers import randomize_fan_in
from tests.test_weights_diffusers import (
    IMAGE,
    VAE,
    assert_state_dicts_equal,
    feature_extractor,
    load_component_torch,
    numpy_sd,
)

# SD 2.x in miniature: linear projections, one head count per block, upcast attention.
UNET2 = dict(block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
             attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
             norm_num_groups=4, in_channels=9, out_channels=4, sample_size=8)
# An OpenCLIP-style tower in transformers format: exact gelu; (4 + 1) // 5 = 1 mapper block.
CLIP2 = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
             image_size=IMAGE, patch_size=8, projection_dim=10, hidden_act="gelu")
# stabilityai/stable-diffusion-2-1's scheduler_config.json (diffusers 0.8.0)
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}


@pytest.fixture(scope="module")
def sd2_repo(tmp_path_factory):
    """(SD 2.x-style diffusers dir, CLIP dir, sd unet, sd vae, clip vision model)."""
    root = tmp_path_factory.mktemp("sd2")
    unet = UNet2DConditionModel(**{**UNET2, "in_channels": 4})
    vae = AutoencoderKL(**VAE)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP2))
    for i, m in enumerate((unet, vae, clip)):
        randomize_fan_in(m, 40 + i)
    unet.save_pretrained(root / "sd" / "unet")
    vae.save_pretrained(root / "sd" / "vae")
    DDIMScheduler.from_config(SD21_SCHEDULER).save_pretrained(root / "sd" / "scheduler")
    clip.save_pretrained(root / "clip")
    return str(root / "sd"), str(root / "clip"), unet, vae, clip


def test_sd_init_from_sd2(sd2_repo, tmp_path):
    sd_dir, clip_dir, unet, vae, clip = sd2_repo
    model_config = {"unet": UNET2, "vae": VAE,
                    "image_encoder": {**CLIP2, "projection_dim": 12, "proj_size": 12}}
    model, report = load_pipeline("sd-init", sd_dir, clip=clip_dir, model_config=model_config, seed=5,
                                  return_report=True)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["_class_name"] == "DDIMScheduler"
    ours, ref = model.unet.torch_state_dict(), numpy_sd(unet)
    w = ours.pop("conv_in.weight")
    assert w.shape == (UNET2["block_out_channels"][0], 9, 3, 3)
    np.testing.assert_array_equal(w[:, :4], ref.pop("conv_in.weight"))
    np.testing.assert_array_equal(w[:, 4:], 0)  # masked-image latent + mask: zero
    assert_state_dicts_equal(ours, ref, "unet (without conv_in.weight)")
    assert model.unet.config.use_linear_projection and model.unet.config.attention_head_dim == (2, 4)
    enc = model.image_encoder.torch_state_dict()
    assert enc["proj_out.weight"].shape == (12, 16)  # tower width -> cross_attention_dim
    # the fresh head has PyTorch's default init: Linear weight and bias U(+-1/sqrt(fan_in))
    for key, fan_in in (("proj_out", 16), ("mapper.blocks.0.attn1.to_q", 16), ("mapper.blocks.0.ff.net.2", 4 * 16)):
        bound = fan_in ** -0.5
        for leaf in ("weight", "bias"):
            v = enc[f"{key}.{leaf}"]
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound, (key, leaf)
    np.testing.assert_array_equal(enc["final_layer_norm.weight"], 1.0)
    np.testing.assert_array_equal(enc["final_layer_norm.bias"], 0.0)
    assert any(k.startswith("image_encoder.mapper.") for k in
               report.initialised["random init (trained from scratch in the paper)"])
    # the export loads in diffusers with prediction_type kept
    out = str(tmp_path / "export")
    save_diffusers(model, out)
    sched = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["scheduler"] == ["diffusers", "DDIMScheduler"]
    loaded = load_component_torch(out, "unet")
    assert loaded.config.use_linear_projection and tuple(loaded.config.attention_head_dim) == (2, 4)
    assert loaded.config.upcast_attention and loaded.config.in_channels == 9
    assert_state_dicts_equal(numpy_sd(loaded), model.unet.torch_state_dict(), "exported unet")
    tower = load_component_torch(out, "image_encoder")
    assert tower.config.hidden_act == "gelu"


def test_sd_init_without_model_config_takes_the_repos(sd2_repo):
    """No model config: the UNet's cross_attention_dim fixes proj_size, the tower its width."""
    sd_dir, clip_dir, *_ = sd2_repo
    model = load_pipeline("sd-init", sd_dir, clip=clip_dir)
    assert model.image_encoder.config.proj_size == UNET2["cross_attention_dim"]
    assert model.image_encoder.config.vision.hidden_act == "gelu"
    assert model.scheduler_config["prediction_type"] == "v_prediction"


def tiny_v_pipeline(seed: int = 7) -> PaintByExamplePipeline:
    unet = UNet2DConditionModel(**UNET2)
    vae = AutoencoderKL(**VAE)
    # diffusers reads the encoder's proj_size from projection_dim: they must agree
    width = UNET2["cross_attention_dim"]
    enc = PaintByExampleImageEncoder(transformers.CLIPVisionConfig(**{**CLIP2, "projection_dim": width}),
                                     proj_size=width)
    for i, m in enumerate((unet, vae, enc)):
        randomize_fan_in(m, seed + i)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                          prediction_type="v_prediction")
    return PaintByExamplePipeline(vae=vae.eval(), image_encoder=enc.eval(), unet=unet.eval(), scheduler=sched,
                                  feature_extractor=feature_extractor(), safety_checker=None,
                                  requires_safety_checker=False)


@pytest.fixture(scope="module")
def v_models(tmp_path_factory):
    torch_pipe = tiny_v_pipeline()
    d = str(tmp_path_factory.mktemp("pbe_v"))
    torch_pipe.save_pretrained(d)
    return torch_pipe, PaintByExample.from_pretrained(d)


@pytest.mark.parametrize("name", ["plms", "ddim"])
def test_v_prediction_sampling_equals_diffusers(v_models, name, monkeypatch):
    torch_pipe, ours = v_models
    assert ours.scheduler_config["prediction_type"] == "v_prediction"
    latents = np.random.default_rng(1).standard_normal((1, H // 2, W // 2, 4)).astype(np.float32)
    sched = PNDMScheduler.from_config(torch_pipe.scheduler.config)
    if name == "ddim":
        sched = DDIMScheduler.from_config(torch_pipe.scheduler.config, clip_sample=False)
    assert sched.config.prediction_type == "v_prediction"
    ref = _diffusers(torch_pipe, sched, latents, 5.0, 10, monkeypatch)
    src, mask, r = _images()
    got = ours(src, mask, r, num_inference_steps=10, guidance_scale=5.0, scheduler=name, latents=latents,
               masked_latents="mode", reference_preprocess="center_crop", output_type="np")
    err = np.abs(got - ref).max()
    assert err <= 2e-3, err
    assert np.abs(ref - 0.5).max() > 0.05  # not a trivial output


# The published config.json / scheduler_config.json fields (less `_diffusers_version`).
SD21_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
             "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 1024,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
             "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
             "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
             "only_cross_attention": False, "out_channels": 4,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "use_linear_projection": True}
SD21_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768,
            "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4}
VIT_H14 = {"architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "dropout": 0.0,
           "hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "initializer_factor": 1.0,
           "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
           "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3,
           "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 1024}


@pytest.mark.parametrize("variant", ["sd21", "sd21_768"])
def test_sd21_configs_describe_the_sd21_repos(variant):
    """configs/pbe.py:sd21 / sd21_768 are the SD 2.1 repos' unet / vae config.json (conv_in
    grown to 9 channels) and scheduler_config.json as published, with proj_size 1024 and the
    tower: laion's ViT-H/14 config.json (a (32 + 1) // 5 = 6-block mapper) or the paper's
    ViT-L/14 (5 blocks)."""
    big = variant == "sd21_768"
    cfg = load_config(f"pbe:{variant},tower=vit_h14")
    published = {"unet": {**SD21_UNET, "in_channels": 9, "sample_size": 96 if big else 64,
                          "upcast_attention": big},
                 "vae": SD21_VAE, "image_encoder": {**VIT_H14, "projection_dim": 1024}}
    check_architecture(parse_component_configs(published), parse_component_configs(cfg.model), variant)
    want_sched = {**SD21_SCHEDULER, "_class_name": "DDIMScheduler" if big else "PNDMScheduler",
                  "prediction_type": "v_prediction" if big else "epsilon"}
    assert cfg.model.scheduler.to_dict() == want_sched
    enc = parse_component_configs(cfg.model)["image_encoder"]
    assert enc.proj_size == 1024 and enc.num_mapper_blocks == 6
    assert cfg.data.resolution == (768 if big else 512) and cfg.init_from.format == "sd-init"
    assert cfg.init_from.path == ("stabilityai/stable-diffusion-2-1" if big else "stabilityai/stable-diffusion-2-1-base")
    assert cfg.init_from.clip == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    paper = load_config(f"pbe:{variant}")
    assert parse_component_configs(paper.model)["image_encoder"].num_mapper_blocks == 5
    assert paper.init_from.clip == "openai/clip-vit-large-patch14"
    assert not paper.data.allow_synthetic


@pytest.mark.parametrize("variant", ["sd15", "sd21", "sd21_768"])
def test_paper_variants_refuse_the_synthetic_default(variant):
    """A paper variant with no --config.data.source fails when its loader is made, naming the
    flags to set; the demo keeps its synthetic default; the flag lets synthetic through."""
    cfg = load_config(f"pbe:{variant}")
    with pytest.raises(ValueError, match=r"--config\.data\.source=.*--config\.data\.annotations=.*"
                                         r"--config\.data\.images_dir="):
        make_loader(cfg.data, global_batch_size=8, seed=0)
    demo = load_config("pbe:demo", {"data.num_workers": 0})
    make_loader(demo.data, global_batch_size=8, seed=0).close()
    ok = load_config(f"pbe:{variant}", {"data.allow_synthetic": True, "data.num_workers": 0,
                                        "data.resolution": 32, "data.reference_size": 32})
    make_loader(ok.data, global_batch_size=8, seed=0).close()
