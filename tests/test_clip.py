"""Parity of pbe_jax.models.clip with transformers' CLIPVisionModel(WithProjection).

Tiny random-init torch models (every parameter randomised, LayerNorms included) are saved with
transformers' `save_pretrained` and loaded with ours; outputs are compared on the same images.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    clip_preprocess,
)
from pbe_jax.models.hub import num_params
from tests.helpers import assert_close, randomize

# name -> (transformers CLIPVisionConfig kwargs, with projection?)
CONFIGS = {
    "quickgelu_1layer_proj": (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                   num_attention_heads=4, image_size=30, patch_size=10,
                                   projection_dim=16, hidden_act="quick_gelu"), True),
    "gelu_2layers": (dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=2, image_size=16, patch_size=4,
                          hidden_act="gelu", layer_norm_eps=1e-6), False),
    # 30 px / 7 px patches: the conv drops the 2-pixel remainder, as torch's does.
    "quickgelu_2layers_proj_ragged": (dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=30, patch_size=7,
                                           projection_dim=8, hidden_act="quick_gelu"), True),
}


def _torch_cls(proj: bool):
    return transformers.CLIPVisionModelWithProjection if proj else transformers.CLIPVisionModel


def _ours_cls(proj: bool):
    return CLIPVisionModelWithProjection if proj else CLIPVisionModel


def _images(cfg: dict, seed: int = 0, batch: int = 2) -> np.ndarray:
    s = cfg["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, s, s, 3), dtype=np.float32)


def _torch_forward(tm, x_nhwc: np.ndarray) -> dict:
    with torch.no_grad():
        out = tm(pixel_values=torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)))
    res = {"last_hidden_state": out.last_hidden_state.numpy()}
    if hasattr(out, "image_embeds") and out.image_embeds is not None:
        res["image_embeds"] = out.image_embeds.numpy()
    else:
        res["pooler_output"] = out.pooler_output.numpy()
    return res


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """A randomised transformers model saved with save_pretrained: (name, cfg, proj, torch model, dir)."""
    name = request.param
    cfg, proj = CONFIGS[name]
    tm = _torch_cls(proj)(transformers.CLIPVisionConfig(**cfg)).eval()
    randomize(tm, seed=len(name))
    d = str(tmp_path_factory.mktemp(name))
    tm.save_pretrained(d)
    return name, cfg, proj, tm, d


def test_parity_fp32(saved):
    name, cfg, proj, tm, d = saved
    model, report = _ours_cls(proj).from_pretrained(d, return_report=True)
    assert report.loaded == len(tm.state_dict())
    x = _images(cfg)
    ref = _torch_forward(tm, x)
    out = model(jnp.asarray(x))
    assert_close(out.last_hidden_state, ref["last_hidden_state"], f"{name} last_hidden_state")
    if proj:
        assert_close(out.image_embeds, ref["image_embeds"], f"{name} image_embeds")
        # the pooler output inside the projection model, against transformers' vision_model
        with torch.no_grad():
            pooled = tm.vision_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
        assert_close(model.vision_model(jnp.asarray(x)).pooler_output, pooled.numpy(),
                      f"{name} pooler_output")
    else:
        assert_close(out.pooler_output, ref["pooler_output"], f"{name} pooler_output")


def test_bf16_close_to_fp32(saved):
    name, cfg, proj, _, d = saved
    x = jnp.asarray(_images(cfg, seed=1))
    f32 = _ours_cls(proj).from_pretrained(d)(x)
    bf16 = _ours_cls(proj).from_pretrained(d, dtype=jnp.bfloat16)(x)
    for field in f32._fields:
        a, b = np.asarray(getattr(f32, field)), np.asarray(getattr(bf16, field), np.float32)
        assert getattr(bf16, field).dtype == jnp.bfloat16
        rel = np.abs(b - a).max() / np.abs(a).max()
        assert rel <= 2e-2, f"{name} {field}: bf16 relative error {rel}"


def test_save_pretrained_loads_in_transformers(saved, tmp_path):
    name, cfg, proj, tm, d = saved
    model = _ours_cls(proj).from_pretrained(d)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == [_torch_cls(proj).__name__]
    assert written["model_type"] == "clip_vision_model"
    back, info = _torch_cls(proj).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    ref_sd, back_sd = tm.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    for k in cfg:
        assert getattr(back.config, k) == cfg[k], k


def test_full_clip_checkpoint_ignores_text_tower(tmp_path):
    """A `CLIPModel` (text + vision) checkpoint, as openai/clip-vit-large-patch14 is, loads into the
    vision models; the text keys are reported as ignored. The top-level `projection_dim` is the
    one `visual_projection` has (transformers' CLIPVisionModelWithProjection.from_pretrained reads
    the stale vision_config one and fails on such a checkpoint, so the reference is built by
    copying the weights)."""
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                  image_size=30, patch_size=10)
    text = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    full = transformers.CLIPModel(
        transformers.CLIPConfig(projection_dim=12, vision_config=vision, text_config=text)).eval()
    randomize(full, seed=5)
    full.save_pretrained(str(tmp_path))

    ref = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**vision, projection_dim=12)).eval()
    sd = {k: v for k, v in full.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    ref.load_state_dict(sd, strict=True)

    model, report = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path), return_report=True)
    text_keys = sorted(k for k in full.state_dict() if k.startswith(("text_model.", "text_projection.")))
    assert set(report.ignored) == set(text_keys) | {"logit_scale"}
    assert report.loaded == len(sd)
    x = _images(vision, seed=2)
    want = _torch_forward(ref, x)
    out = model(jnp.asarray(x))
    np.testing.assert_array_equal(out.image_embeds.shape, (2, 12))
    assert_close(out.image_embeds, want["image_embeds"], "image_embeds")
    assert_close(out.last_hidden_state, want["last_hidden_state"], "last_hidden_state")

    plain, report = CLIPVisionModel.from_pretrained(str(tmp_path), return_report=True)
    assert "visual_projection.weight" in report.ignored
    with torch.no_grad():
        pooled = ref.vision_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
    assert_close(plain(jnp.asarray(x)).pooler_output, pooled.numpy(), "pooler_output")


def _tamper(src_dir, dst, fn):
    os.makedirs(dst, exist_ok=True)
    sd = dict(stio.read_safetensors(os.path.join(src_dir, "model.safetensors")))
    fn(sd)
    stio.write_safetensors(os.path.join(dst, "model.safetensors"), sd)
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


def test_bad_checkpoint_fails_naming_the_key(tmp_path):
    cfg, _ = CONFIGS["quickgelu_1layer_proj"]
    tm = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
    src = str(tmp_path / "src")
    tm.save_pretrained(src)
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"

    def rename(sd):
        sd["vision_model.encoder.layers.0.mlp.fc_1.weight"] = sd.pop(fc1)

    def reshape(sd):
        sd[fc1] = np.zeros((36, 32), np.float32)

    with pytest.raises(CheckpointMismatchError) as e:
        CLIPVisionModelWithProjection.from_pretrained(_tamper(src, tmp_path / "renamed", rename))
    assert fc1 in str(e.value) and "fc_1.weight" in str(e.value)
    with pytest.raises(CheckpointMismatchError) as e:
        CLIPVisionModelWithProjection.from_pretrained(_tamper(src, tmp_path / "reshaped", reshape))
    assert fc1 in str(e.value) and "(36, 32)" in str(e.value)


def test_config_from_dicts():
    # The default transformers config is ViT-B/32; a full CLIPConfig dump (with every generic
    # PretrainedConfig key) gives its vision part and the top-level projection_dim.
    assert CLIPVisionConfig.from_dict(transformers.CLIPVisionConfig().to_dict()) == CLIPVisionConfig.vit_b32()
    l14 = transformers.CLIPConfig(
        projection_dim=768,
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, patch_size=14)).to_dict()
    assert l14["model_type"] == "clip"
    assert CLIPVisionConfig.from_dict(l14) == CLIPVisionConfig.vit_l14()
    old_style = {"model_type": "clip", "projection_dim": 768, "vision_config": None,
                 "vision_config_dict": dict(hidden_size=1024, intermediate_size=4096,
                                            num_hidden_layers=24, num_attention_heads=16,
                                            patch_size=14)}
    assert CLIPVisionConfig.from_dict(old_style) == CLIPVisionConfig.vit_l14()
    with pytest.raises(ValueError, match="use_rope"):
        CLIPVisionConfig.from_dict({"model_type": "clip_vision_model", "use_rope": True})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig.from_dict({"hidden_act": "mish"})
    with pytest.raises(ValueError, match="model_type"):
        CLIPVisionConfig.from_dict({"model_type": "siglip_vision_model"})


def test_vit_l14_parameter_count():
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**{k: v for k, v in CLIPVisionConfig.vit_l14().to_dict().items()
                                             if k not in ("architectures", "model_type")}))
    abstract = CLIPVisionModelWithProjection.from_config(CLIPVisionConfig.vit_l14(), abstract=True)
    assert num_params(abstract) == sum(p.numel() for p in ref.parameters())


def test_wrong_image_size_raises():
    cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, image_size=8, patch_size=4)
    model = CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected"):
        model(jnp.zeros((1, 12, 12, 3)))


# ---------------------------------------------------------------- clip_preprocess


def _normalise(x01: np.ndarray) -> np.ndarray:
    return (x01 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def test_preprocess_crop_geometry_and_normalisation():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (2, 32, 44, 3), dtype=np.uint8)  # short side already 32
    out = np.asarray(clip_preprocess(jnp.asarray(wide), size=32, mode="center_crop"))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _normalise(wide[:, :, 6:38] / np.float32(255)), atol=1e-6)
    tall = rng.random((1, 37, 32, 3), dtype=np.float32)  # float input in [0, 1]
    out = np.asarray(clip_preprocess(jnp.asarray(tall), size=32, mode="center_crop"))
    np.testing.assert_allclose(out, _normalise(tall[:, 2:34]), atol=1e-6)
    same = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(clip_preprocess(jnp.asarray(same), size=32, mode="squash"))
    np.testing.assert_allclose(out, _normalise(same / np.float32(255)), atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        clip_preprocess(jnp.asarray(same), size=32, mode="pad")
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(jnp.asarray(same, jnp.int32), size=32)


def _smooth_image(h, w, seed):
    """A smooth uint8 image (low-frequency sinusoids), where resampling kernels agree closely."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = [0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.uniform(0.5, 2) * xx)
                                + rng.uniform(0, 6)) for _ in range(3)]
    return np.round(np.stack(chans, -1) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["squash", "center_crop"])
@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_preprocess_resize_close_to_pil(mode, kind):
    """Against PIL bicubic (what the CLIP processors and the official PbE inference script use)."""
    if kind == "smooth":
        img = _smooth_image(70, 100, seed=1)
    else:
        img = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    size = 32
    pil = Image.fromarray(img)
    if mode == "squash":
        ref = np.asarray(pil.resize((size, size), Image.BICUBIC))
    else:
        nw = int(size * 100 / 70)  # short side (height) -> 32, long side floored: 45
        ref = np.asarray(pil.resize((nw, size), Image.BICUBIC))[:, (nw - size) // 2:(nw - size) // 2 + size]
    ref = _normalise(ref / np.float32(255))
    out = np.asarray(clip_preprocess(jnp.asarray(img[None]), size=size, mode=mode))[0]
    assert out.shape == ref.shape
    # PIL rounds to uint8 (1 level = 0.015 after normalisation) after each separable pass.
    err = np.abs(out - ref)
    assert err.max() < (0.02 if kind == "smooth" else 0.05), err.max()
    assert err.mean() < 0.006, err.mean()


def test_preprocess_jits_under_outer_jit():
    f = jax.jit(lambda x: clip_preprocess(x, size=16, mode="center_crop"))
    out = f(jnp.zeros((1, 20, 30, 3), jnp.uint8))
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), _normalise(np.zeros(3, np.float32)), atol=1e-6)
