"""Parity of pbe_jax.models.unet.UNet2DConditionModel with diffusers' UNet2DConditionModel.

Every tiny config is built in diffusers with random weights (norm and bias params included),
written by diffusers' `save_pretrained` and read by our `from_pretrained`; outputs are compared
on the same inputs (NCHW -> NHWC). Models are built once per module (fixtures) to keep the
suite cheap on 2 CPU cores.
"""
import functools
import gc
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.hub import num_params
from pbe_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers import OPTIMIZED, randomize_fan_in

# A: the PbE layout in miniature (9 input channels, 1-token context, CrossAttn+plain blocks).
CFG_A = dict(
    sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8)
# B: per-block heads, linear projections, 2 transformer layers in one block, layers_per_block 2,
# 4 input channels, other norm groups / eps / time-embedding flavour, 5-token context.
CFG_B = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, cross_attention_dim=20, norm_num_groups=4, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1)
# C: the less common switches: per-block layers / cross dims, only_cross_attention list,
# upcast, centred input, padding-0 downsampling, mid scale factor, custom time width.
CFG_C = dict(
    sample_size=8, in_channels=4, out_channels=3, block_out_channels=(16, 32),
    layers_per_block=(1, 2), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 2),
    cross_attention_dim=(16, 16), only_cross_attention=(True, False), upcast_attention=True,
    center_input_sample=True, downsample_padding=0, mid_block_scale_factor=1.4142,
    time_embedding_dim=48, norm_num_groups=8, act_fn="silu")


def _build(cfg: dict, path, seed: int = 0) -> TorchUNet:
    torch_unet = TorchUNet(**cfg).eval()
    randomize_fan_in(torch_unet, seed, gain=1.5, is_norm_scale=lambda name: name.endswith("weight"))
    torch_unet.save_pretrained(str(path))
    return torch_unet


def _inputs(cfg, batch=2, hw=(8, 8), ctx_len=1, seed=0):
    rng = np.random.default_rng(seed)
    cross = cfg["cross_attention_dim"]
    cross = cross if isinstance(cross, int) else cross[0]
    x = rng.standard_normal((batch, cfg["in_channels"], *hw), dtype=np.float32)  # NCHW
    ctx = rng.standard_normal((batch, ctx_len, cross), dtype=np.float32)
    return x, ctx


def _torch_out(torch_unet, x, t, ctx) -> np.ndarray:
    t = torch.from_numpy(np.asarray(t)) if isinstance(t, np.ndarray) else t
    with torch.no_grad():
        return torch_unet(torch.from_numpy(x), t, torch.from_numpy(ctx)).sample.numpy()


@nnx.jit
def _forward(unet, x, t, ctx):
    return unet(x, t, ctx)


def _ours_out(unet, x, t, ctx) -> np.ndarray:
    # jit: one compile is cheaper than eager op-by-op compiles on CPU
    out = _forward(unet, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    return np.asarray(out, dtype=np.float32).transpose(0, 3, 1, 2)


def _assert_parity(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
    assert err <= 1e-4 * scale, f"max|ours - torch| = {err:.3g}, max|torch| = {np.abs(ref).max():.3g}"


@pytest.fixture(scope="module")
def unet_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet_a")
    return _build(CFG_A, path, seed=1), path


@pytest.fixture(scope="module")
def ours_a(unet_a):
    return UNet2DConditionModel.from_pretrained(str(unet_a[1]))


def test_parity_pbe_layout(unet_a, ours_a):
    torch_unet, _ = unet_a
    x, ctx = _inputs(CFG_A, ctx_len=1)
    t = np.array([999, 17])
    _assert_parity(_ours_out(ours_a, x, t, ctx), _torch_out(torch_unet, x, t, ctx))


@pytest.mark.parametrize("cfg, hw, ctx_len, t", [
    (CFG_B, (10, 7), 5, 500.5),  # 7 % 2 != 0: the upsample-to-skip-size path; float timestep
    (CFG_C, (8, 8), 3, 250),  # scalar int timestep broadcast to the batch
], ids=["B", "C"])
def test_parity_configs(cfg, hw, ctx_len, t, tmp_path):
    torch_unet = _build(cfg, tmp_path, seed=2)
    ours = UNet2DConditionModel.from_pretrained(str(tmp_path))
    x, ctx = _inputs(cfg, hw=hw, ctx_len=ctx_len, seed=3)
    _assert_parity(_ours_out(ours, x, t, ctx), _torch_out(torch_unet, x, t, ctx))


def _count_remat(model, x, t, ctx) -> int:
    """Number of rematerialised regions (jax `checkpoint` primitives) in the forward jaxpr."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, t, ctx))(state)
    return sum(str(e.primitive) in ("checkpoint", "remat", "remat2")
               for e in jaxpr.jaxpr.eqns)


@pytest.mark.slow
def test_remat_same_output_and_input_grad(unet_a, ours_a):
    remat = UNet2DConditionModel.from_pretrained(str(unet_a[1]), remat=True,
                                                 remat_policy="nothing_saveable")
    x, ctx = _inputs(CFG_A, ctx_len=1, seed=5)
    x, ctx = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx)
    w = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t = jnp.array([10, 900])

    def loss_and_grad(model, xx):  # at XLA's default optimisation, as training runs
        graphdef, state = nnx.split(model)

        @functools.partial(jax.jit, compiler_options=OPTIMIZED)
        def run(state, xx):
            def f(m, xi):
                return jnp.sum(m(xi, t, ctx) * w)
            return nnx.value_and_grad(f, argnums=1)(nnx.merge(graphdef, state), xx)
        return run(state, xx)

    (l0, g0), (l1, g1) = loss_and_grad(ours_a, x), loss_and_grad(remat, x)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(g0).max()))
    assert float(jnp.abs(g0).max()) > 0
    # gradient checkpointing really is on: one checkpointed region per ResnetBlock2D and per
    # Transformer2DModel, and none without remat
    n_blocks = sum(len(b.resnets) + (len(b.attentions) if b.attentions is not None else 0)
                   for b in [*remat.down_blocks, remat.mid_block, *remat.up_blocks])
    assert _count_remat(remat, x, t, ctx) == n_blocks
    assert _count_remat(ours_a, x, t, ctx) == 0


def test_bf16_close_to_fp32(unet_a, ours_a):
    bf16 = UNet2DConditionModel.from_pretrained(str(unet_a[1]), dtype=jnp.bfloat16)
    x, ctx = _inputs(CFG_A, ctx_len=1, seed=6)
    t = np.array([999, 1])
    ref, out = _ours_out(ours_a, x, t, ctx), _ours_out(bf16, x, t, ctx)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= 2e-2, rel


def test_save_pretrained_loads_in_diffusers(unet_a, ours_a, tmp_path):
    torch_ref, _ = unet_a
    ours_a.save_pretrained(str(tmp_path))
    back, info = TorchUNet.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    sd_back, sd_ref = back.state_dict(), torch_ref.state_dict()
    assert set(sd_back) == set(sd_ref)
    for key, value in sd_ref.items():
        assert torch.equal(sd_back[key], value), key
    # the written config.json round-trips through diffusers' config back to ours
    assert UNetConfig.from_dict(dict(back.config)) == ours_a.config == UNetConfig.from_dict(CFG_A)


def _rewrite_checkpoint(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = stio.read_safetensors(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    edit(sd)
    stio.write_safetensors(os.path.join(dst, "diffusion_pytorch_model.safetensors"), sd)


def test_checkpoint_mismatch_names_the_key(unet_a, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    def rename(sd):
        sd[key.replace("to_k", "to_kk")] = sd.pop(key)

    def reshape(sd):
        sd["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)

    _rewrite_checkpoint(unet_a[1], tmp_path / "renamed", rename)
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        UNet2DConditionModel.from_pretrained(str(tmp_path / "renamed"))
    _rewrite_checkpoint(unet_a[1], tmp_path / "reshaped", reshape)
    with pytest.raises(CheckpointMismatchError, match=r"conv_out\.weight"):
        UNet2DConditionModel.from_pretrained(str(tmp_path / "reshaped"))


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 16), ("encoder_hid_dim", 32), ("conv_in_kernel", 1),
    ("resnet_time_scale_shift", "scale_shift"), ("attention_type", "gated"),
    ("num_attention_heads", 4), ("dual_cross_attention", True), ("no_such_field", 1),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
])
def test_unsupported_config_raises_naming_field(field, value):
    raw = dict(CFG_A, **{field: value})
    with pytest.raises(ValueError, match=field if field != "down_block_types" else "SimpleCrossAttn"):
        UNetConfig.from_dict(raw)


def test_pbe_config_matches_spec():
    cfg = UNetConfig.paint_by_example()
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (9, 4, 64)
    assert cfg.block_out_channels == (320, 640, 1280, 1280) and cfg.layers_per_block == 2
    assert (cfg.attention_head_dim, cfg.cross_attention_dim) == (8, 768)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.slow
def test_full_pbe_unet_param_count_and_parity(tmp_path):
    """The full SD-1.x PbE UNet: diffusers' parameter count, then one forward pass at a 16x16
    latent with a 1-token 768-d context, through diffusers save_pretrained -> our from_pretrained."""
    t0 = time.time()
    cfg = UNetConfig.paint_by_example()
    abstract = UNet2DConditionModel.from_config(cfg, abstract=True)
    with torch.device("meta"):
        meta = TorchUNet.from_config(cfg.to_dict())
    n_torch = sum(p.numel() for p in meta.parameters())
    assert num_params(abstract) == n_torch
    assert 859_000_000 < n_torch < 860_000_000  # 859.5 M
    del meta, abstract

    torch.manual_seed(0)
    torch_unet = TorchUNet.from_config(cfg.to_dict()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms start at (1, 0) in torch; make them random too
        for name, p in torch_unet.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x, ctx = _inputs(cfg.to_dict(), batch=1, hw=(16, 16), ctx_len=1, seed=7)
    ref = _torch_out(torch_unet, x, np.array([321]), ctx)
    torch_unet.save_pretrained(str(tmp_path))
    del torch_unet
    gc.collect()
    ours = UNet2DConditionModel.from_pretrained(str(tmp_path))
    _assert_parity(_ours_out(ours, x, np.array([321]), ctx), ref)
    print(f"full PbE UNet test: {time.time() - t0:.1f}s")
