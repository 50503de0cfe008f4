"""Parity of pbe_jax.models.conditioner with diffusers' PaintByExampleImageEncoder.

Tiny random-init diffusers encoders (every parameter randomised: LayerNorms, uncond_vector) are
saved with diffusers' `save_pretrained` and loaded with ours.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.deprecated.paint_by_example.image_encoder import (
    PaintByExampleImageEncoder as TorchEncoder,
)
from flax import nnx

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.models.clip import CLIPVisionConfig
from pbe_jax.models.conditioner import (
    PaintByExampleEncoderConfig,
    PaintByExampleImageEncoder,
    trainable_filter,
)
from pbe_jax.models.hub import num_params
from tests.helpers import assert_close, randomize

# name -> (transformers CLIPVisionConfig kwargs, proj_size, expected mapper blocks)
CONFIGS = {
    "4layers_1block": (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4,
                            num_attention_heads=4, image_size=30, patch_size=10,
                            hidden_act="quick_gelu"), 24, 1),
    "9layers_2blocks": (dict(hidden_size=16, intermediate_size=24, num_hidden_layers=9,
                             num_attention_heads=2, image_size=16, patch_size=8,
                             hidden_act="gelu"), 12, 2),
}


# Jitted calls (compiled per model structure, method and input shape): much cheaper on the CPU
# than eager op-by-op dispatch of the same forward passes.
_call = nnx.jit(lambda enc, x: enc(x, return_uncond_vector=True))
_pooled = nnx.jit(lambda enc, x: enc.clip_pooled(x))
_project = nnx.jit(lambda enc, pooled: enc.project(pooled))


def _embeds(enc, x):
    return _call(enc, x)[0]


def _images(cfg, seed=0, batch=2):
    s = cfg["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, s, s, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def save_cache(tmp_path_factory):
    """name -> (name, cfg, diffusers encoder, dir saved with diffusers' save_pretrained), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, proj, blocks = CONFIGS[name]
            # projection_dim = proj_size: the saved config.json must rebuild the same proj_out
            te = TorchEncoder(transformers.CLIPVisionConfig(**cfg, projection_dim=proj), proj_size=proj).eval()
            assert len(te.mapper.blocks) == blocks
            randomize(te, seed=len(name))
            d = str(tmp_path_factory.mktemp(name))
            te.save_pretrained(d)
            cache[name] = (name, cfg, te, d)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, save_cache):
    return save_cache(request.param)


def test_parity_fp32(saved):
    name, cfg, te, d = saved
    ours, report = PaintByExampleImageEncoder.from_pretrained(d, return_report=True)
    assert report.loaded == len(te.state_dict())
    assert ours.config.num_mapper_blocks == len(te.mapper.blocks)
    x = _images(cfg)
    with torch.no_grad():
        ref, ref_uc = te(torch.from_numpy(x.transpose(0, 3, 1, 2)), return_uncond_vector=True)
    out, uc = _call(ours, jnp.asarray(x))
    assert_close(out, ref.numpy(), f"{name} embeds")
    np.testing.assert_array_equal(np.asarray(uc), ref_uc.detach().numpy())
    # the split used by training: frozen tower, then the trainable head
    ours_pooled = _pooled(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(_project(ours, ours_pooled)), np.asarray(out), rtol=0, atol=1e-6)
    with torch.no_grad():
        pooled = te.model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
    assert_close(ours_pooled, pooled.numpy(), f"{name} pooled")


def test_bf16_close_to_fp32(save_cache):
    # one config: the tower's bf16 error is covered per config in test_clip
    name, cfg, _, d = save_cache("4layers_1block")
    x = jnp.asarray(_images(cfg, seed=1))
    f32 = np.asarray(_embeds(PaintByExampleImageEncoder.from_pretrained(d), x))
    bf16 = _embeds(PaintByExampleImageEncoder.from_pretrained(d, dtype=jnp.bfloat16), x)
    assert bf16.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(bf16, np.float32) - f32).max() / np.abs(f32).max()
    assert rel <= 2e-2, f"{name}: bf16 relative error {rel}"


def test_save_pretrained_loads_in_diffusers(saved, tmp_path):
    name, cfg, te, d = saved
    ours = PaintByExampleImageEncoder.from_pretrained(d)
    ours.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == ["PaintByExampleImageEncoder"]
    back, info = TorchEncoder.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    assert back.proj_size == te.proj_size
    ref_sd, back_sd = te.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k


def test_released_key_spelling_loads(saved, tmp_path):
    """The released checkpoint spells the tower `model.vision_model.*` and may hold the
    `position_ids` buffer; both load (the buffer is reported as ignored)."""
    name, cfg, te, d = saved
    sd = {k: v.numpy() for k, v in te.state_dict().items()}
    legacy = {("model.vision_model." + k[6:] if k.startswith("model.") else k): v for k, v in sd.items()}
    n_pos = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    legacy["model.vision_model.embeddings.position_ids"] = np.arange(n_pos, dtype=np.int64)[None]
    stio.write_safetensors(str(tmp_path / "model.safetensors"), legacy)
    with open(os.path.join(d, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
        g.write(f.read())
    ours, report = PaintByExampleImageEncoder.from_pretrained(str(tmp_path), return_report=True)
    assert report.ignored == ["model.vision_model.embeddings.position_ids"]
    assert report.loaded == len(sd)
    theirs = PaintByExampleImageEncoder.from_pretrained(d)
    x = jnp.asarray(_images(cfg, seed=4))
    np.testing.assert_array_equal(np.asarray(_embeds(ours, x)), np.asarray(_embeds(theirs, x)))


def test_config_proj_size_is_projection_dim():
    raw = transformers.CLIPVisionConfig(hidden_size=16, num_attention_heads=2, projection_dim=40).to_dict()
    cfg = PaintByExampleEncoderConfig.from_dict(raw)
    assert cfg.proj_size == 40 and cfg.hidden_size == 16
    assert cfg.to_dict()["projection_dim"] == 40
    del raw["projection_dim"]  # diffusers then falls back to CLIP's default, 512
    assert PaintByExampleEncoderConfig.from_dict(raw).proj_size == 512
    with pytest.raises(ValueError, match="proj_size"):
        PaintByExampleEncoderConfig.from_dict({**raw, "projection_dim": 40, "proj_size": 768})


def test_paint_by_example_config_matches_diffusers_parameter_count():
    cfg = PaintByExampleEncoderConfig.paint_by_example()
    assert cfg.vision == CLIPVisionConfig.vit_l14() and cfg.proj_size == 768
    assert cfg.num_mapper_blocks == 5
    tc = transformers.CLIPVisionConfig(**{k: v for k, v in cfg.to_dict().items()
                                          if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        ref = TorchEncoder(tc, proj_size=768)
    abstract = PaintByExampleImageEncoder.from_config(cfg, abstract=True)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert num_params(abstract) == n_ref
    n_trainable = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("model."))
    trainable = nnx.state(abstract, trainable_filter())
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable)) == n_trainable


def test_uncond_vector_logical_axes():
    cfg = PaintByExampleEncoderConfig(vision=CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=4, num_attention_heads=1,
        image_size=8, patch_size=4), proj_size=6)
    enc = PaintByExampleImageEncoder.from_config(cfg, abstract=True)
    assert enc.uncond_vector.get_metadata()["out_sharding"] == (None, None, "embed")
    assert enc.proj_out.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_gradients_reach_only_the_trainable_head_and_remat_matches():
    cfg = PaintByExampleEncoderConfig(vision=CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        image_size=8, patch_size=4), proj_size=8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3), dtype=np.float32))

    plain_enc = PaintByExampleImageEncoder.from_config(cfg, seed=1)
    remat_enc = PaintByExampleImageEncoder.from_config(cfg, abstract=True, remat=True)
    nnx.update(remat_enc, nnx.state(plain_enc))  # the same params (one eager random init)

    def grads(enc):
        graphdef, params, rest = nnx.split(enc, nnx.Param, ...)

        @jax.jit
        def loss_grad(params, rest):
            def loss(p):
                return jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
            return jax.grad(loss)(params)

        return nnx.to_flat_state(loss_grad(params, rest))

    plain, remat = grads(plain_enc), grads(remat_enc)
    assert len(plain) == len(remat)
    for (path, g), (path2, g2) in zip(plain, remat):
        assert path == path2
        np.testing.assert_allclose(np.asarray(g2.get_value()), np.asarray(g.get_value()),
                                   rtol=1e-5, atol=1e-6, err_msg=str(path))
        norm = float(jnp.abs(g.get_value()).max())
        # Zero: the frozen CLIP tower (stop_gradient), to_q/to_k of the mapper (one token:
        # softmax == 1, PBE_SPEC 1.3) and uncond_vector (not used by the conditional branch).
        zero = path[0] in ("model", "uncond_vector") or "to_q" in path or "to_k" in path
        assert (norm == 0.0) if zero else (norm > 0.0), (path, norm)
