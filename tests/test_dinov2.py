"""Parity of pbe_jax.models.dinov2 with transformers' Dinov2Model / Dinov2WithRegistersModel.

Tiny random-init torch models (every parameter randomised, LayerNorms, layer scales, tokens and
position tables included) are saved with transformers' `save_pretrained` and loaded with ours;
outputs are compared on the same images, at the config's size (the position table as is) and at
non-square / other sizes (the table resampled bicubically, with or without antialiasing).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import CheckpointMismatchError
from pbe_jax.models.dinov2 import (
    PRESETS,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersModel,
    bicubic_resize_matrix,
    dinov2_class,
    dinov2_from_pretrained,
    drop_registers,
)
from pbe_jax.models.hub import num_params
from pbe_jax.models.init import host_init
from tests.test_hub import put_in_cache

# name -> (transformers config kwargs, with registers?, input sizes (H, W) to compare at)
CONFIGS = {
    # 4x4 position grid; 35x21 -> 5x3 patches (up in H, down in W), 60x44 -> 8x6 (ragged: the
    # conv drops the remainder)
    "mlp": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                 patch_size=7), False, [(28, 28), (35, 21), (60, 44)]),
    # SwiGLU (hidden int(int(24 * 4) * 2 / 3) rounded up to 8 = 64), no q/k/v bias, 3 layers;
    # a square input with another patch count is resampled too
    "swiglu_nobias": (dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                           image_size=24, patch_size=4, use_swiglu_ffn=True, qkv_bias=False,
                           mlp_ratio=4, layerscale_value=0.1, layer_norm_eps=1e-5),
                      False, [(24, 24), (16, 16), (20, 36)]),
    # registers: antialiased resampling, 8x8 grid downsampled to 4x5 and up to 9x9
    "registers_mlp": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=7, num_register_tokens=4,
                           hidden_act="gelu"), True, [(56, 56), (28, 35), (63, 63)]),
    "registers_swiglu": (dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              image_size=30, patch_size=6, num_register_tokens=2,
                              use_swiglu_ffn=True, mlp_ratio=3), True, [(30, 30), (18, 42)]),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if p.ndim > 1 else 0.1))


def _torch_model(cfg: dict, registers: bool):
    if registers:
        return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**cfg)).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**cfg)).eval()


# One jitted forward (compiled per model structure and input shape): much cheaper than eager
# op-by-op dispatch on the CPU.
_forward = nnx.jit(lambda model, x, mask=None: model(x, mask))


def _images(h: int, w: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3), dtype=np.float32)


def _torch_forward(tm, x_nhwc: np.ndarray, **kw):
    with torch.no_grad():
        return tm(pixel_values=torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), **kw)


def _assert_close(ours, ref, name, tol=1e-5):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err <= tol * max(1.0, np.abs(ref).max()), f"{name}: max|ours - torch| = {err}"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """A randomised transformers model saved with save_pretrained: (name, torch model, dir)."""
    name = request.param
    cfg, registers, _ = CONFIGS[name]
    tm = _torch_model(cfg, registers)
    _randomize(tm, seed=len(name))
    d = str(tmp_path_factory.mktemp(name))
    tm.save_pretrained(d)
    return name, tm, d


def test_parity_fp32(saved):
    name, tm, d = saved
    cfg, registers, sizes = CONFIGS[name]
    model = dinov2_from_pretrained(d)
    assert type(model) is (Dinov2WithRegistersModel if registers else Dinov2Model)
    for h, w in sizes:
        x = _images(h, w, seed=h + w)
        ref = _torch_forward(tm, x)
        out = _forward(model, jnp.asarray(x))
        assert out.last_hidden_state.shape[1] == model.config.num_tokens(h, w)
        _assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), f"{name} {h}x{w} last_hidden_state")
        _assert_close(out.pooler_output, ref.pooler_output.numpy(), f"{name} {h}x{w} pooler_output")
        # AnyDoor's ID tokens: CLS + patches, registers dropped
        r = cfg.get("num_register_tokens", 0) if registers else 0
        want = torch.cat([ref.last_hidden_state[:, :1], ref.last_hidden_state[:, 1 + r:]], 1)
        _assert_close(drop_registers(out.last_hidden_state, r), want.numpy(), f"{name} tokens")


def test_load_counts_every_checkpoint_tensor(saved):
    name, _, d = saved
    model, report = dinov2_from_pretrained(d, return_report=True)
    on_disk = stio.read_safetensors(os.path.join(d, "model.safetensors"))
    assert report.loaded == len(on_disk) and not report.ignored
    assert set(model.torch_state_dict()) == set(on_disk)


def test_transformers5_in_memory_state_dict_loads(saved):
    """`model.state_dict()` of transformers 5 (q_proj / o_proj / gate_proj + up_proj names)."""
    name, tm, d = saved
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert any(".attention.q_proj." in k for k in sd)
    config = Dinov2Model.load_config(d)
    model = dinov2_class(config).from_config_and_state_dict(config, sd)
    ref = dinov2_from_pretrained(d)
    x = jnp.asarray(_images(*CONFIGS[name][2][-1], seed=3))
    np.testing.assert_array_equal(np.asarray(_forward(model, x).last_hidden_state),
                                  np.asarray(_forward(ref, x).last_hidden_state))


def test_masked_positions(saved):
    name, tm, d = saved
    cfg, _, sizes = CONFIGS[name]
    h, w = sizes[0]
    model = dinov2_from_pretrained(d)
    x = _images(h, w, seed=7)
    n = (h // cfg["patch_size"]) * (w // cfg["patch_size"])
    mask = np.random.default_rng(1).random((2, n)) < 0.5
    ref = _torch_forward(tm, x, bool_masked_pos=torch.from_numpy(mask))
    out = _forward(model, jnp.asarray(x), jnp.asarray(mask))
    _assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), f"{name} masked")


def test_bf16_and_remat(saved):
    name, _, d = saved
    h, w = CONFIGS[name][2][-1]
    x = jnp.asarray(_images(h, w, seed=1))
    f32 = _forward(dinov2_from_pretrained(d), x).last_hidden_state
    remat = _forward(dinov2_from_pretrained(d, remat=True), x).last_hidden_state
    np.testing.assert_allclose(np.asarray(remat), np.asarray(f32), atol=1e-6)
    bf16 = _forward(dinov2_from_pretrained(d, dtype=jnp.bfloat16), x).last_hidden_state
    assert bf16.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
    assert rel <= 3e-2, f"{name}: bf16 relative error {rel}"


def test_save_pretrained_round_trips_bitwise(saved, tmp_path):
    """Ours -> folder: the same tensors bit for bit, and transformers loads it with no gaps."""
    name, tm, d = saved
    model = dinov2_from_pretrained(d)
    model.save_pretrained(str(tmp_path))
    src = stio.read_safetensors(os.path.join(d, "model.safetensors"))
    back = stio.read_safetensors(os.path.join(tmp_path, "model.safetensors"))
    assert set(src) == set(back)
    for k in src:
        assert src[k].dtype == back[k].dtype and src[k].shape == back[k].shape, k
        assert src[k].tobytes() == back[k].tobytes(), k
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["architectures"] == [type(tm).__name__]
    loaded, info = type(tm).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    for k, v in tm.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size",
              "patch_size", "layer_norm_eps", "layerscale_value", "use_swiglu_ffn", "qkv_bias",
              "hidden_act"):
        assert getattr(loaded.config, k) == getattr(tm.config, k), k
    if hasattr(tm.config, "num_register_tokens"):
        assert loaded.config.num_register_tokens == tm.config.num_register_tokens


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("antialias", [False, True])
def test_position_resampling_matches_torch_interpolate(antialias):
    """The 1-D resampling matrices against torch's separable bicubic, up and down, incl. 37 -> 16
    (ViT-g/14's 518 px table at 224 px) and sizes where the source coordinate leaves the grid."""
    rng = np.random.default_rng(0)
    for s in (2, 4, 5, 16, 37):
        x = rng.standard_normal((s, s, 6)).astype(np.float32)
        for oh, ow in ((1, 1), (3, 7), (16, 16), (9, 40), (37, 24)):
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(x.transpose(2, 0, 1))[None], size=(oh, ow), mode="bicubic",
                align_corners=False, antialias=antialias)[0].numpy().transpose(1, 2, 0)
            out = np.einsum("ia,jb,abd->ijd", bicubic_resize_matrix(s, oh, antialias),
                            bicubic_resize_matrix(s, ow, antialias), x)
            assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), (s, oh, ow)
    # the two modes differ (a = -0.75 clamped vs a = -0.5 widened): the test can tell them apart
    assert np.abs(bicubic_resize_matrix(37, 16, False) - bicubic_resize_matrix(37, 16, True)).max() > 1e-2


# ---------------------------------------------------------------- strictness


def _tamper(src_dir, dst, fn):
    os.makedirs(dst, exist_ok=True)
    sd = dict(stio.read_safetensors(os.path.join(src_dir, "model.safetensors")))
    fn(sd)
    stio.write_safetensors(os.path.join(dst, "model.safetensors"), sd)
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


def test_bad_checkpoint_fails_naming_every_key(tmp_path):
    cfg, _, _ = CONFIGS["registers_swiglu"]
    tm = _torch_model(cfg, True)
    src = str(tmp_path / "src")
    tm.save_pretrained(src)
    w_in = "encoder.layer.1.mlp.weights_in.weight"
    lam = "encoder.layer.0.layer_scale2.lambda1"

    def rename_and_drop(sd):
        sd["encoder.layer.1.mlp.weight_in.weight"] = sd.pop(w_in)
        del sd[lam]
        sd["embeddings.extra_token"] = np.zeros((1, 16), np.float32)

    def reshape(sd):
        sd["embeddings.register_tokens"] = np.zeros((1, 3, 16), np.float32)

    with pytest.raises(CheckpointMismatchError) as e:
        Dinov2WithRegistersModel.from_pretrained(_tamper(src, tmp_path / "renamed", rename_and_drop))
    msg = str(e.value)
    assert "2 missing keys" in msg and w_in in msg and lam in msg
    assert "2 unexpected keys" in msg and "weight_in.weight" in msg and "embeddings.extra_token" in msg
    with pytest.raises(CheckpointMismatchError) as e:
        Dinov2WithRegistersModel.from_pretrained(_tamper(src, tmp_path / "reshaped", reshape))
    assert "embeddings.register_tokens" in str(e.value) and "(1, 3, 16)" in str(e.value)
    # the wrong class for the folder says which one to use
    with pytest.raises(ValueError, match="Dinov2WithRegistersModel"):
        Dinov2Model.from_pretrained(src)


def test_offline_hub_id_from_cache(saved, tmp_path, monkeypatch):
    """A Hub id resolves from the Hugging Face cache with downloads off (as facebook/dinov2-giant
    would for a user who fetched it once)."""
    name, tm, d = saved
    put_in_cache(d, str(tmp_path), "facebook/dinov2-tiny-test", "d" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = dinov2_from_pretrained("facebook/dinov2-tiny-test", cache_dir=str(tmp_path),
                                   local_files_only=True)
    h, w = CONFIGS[name][2][0]
    x = _images(h, w, seed=4)
    _assert_close(_forward(model, jnp.asarray(x)).last_hidden_state,
                  _torch_forward(tm, x).last_hidden_state.numpy(), f"{name} from cache")
    with pytest.raises(FileNotFoundError, match="facebook/dinov2-absent"):
        dinov2_from_pretrained("facebook/dinov2-absent", cache_dir=str(tmp_path), local_files_only=True)


# ---------------------------------------------------------------- configs and presets


def test_config_from_transformers_dicts():
    assert Dinov2Config.from_dict(transformers.Dinov2Config().to_dict()) == Dinov2Config()
    reg = Dinov2Config.from_dict(transformers.Dinov2WithRegistersConfig().to_dict())
    assert reg.with_registers and reg.num_register_tokens == 4 and reg.patch_size == 16
    # a config.json that omits the registers defaults gets transformers' (patch 16, 4 registers)
    assert Dinov2Config.from_dict({"model_type": "dinov2_with_registers"}) == reg
    g = transformers.Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                  image_size=518, use_swiglu_ffn=True).to_dict()
    assert Dinov2Config.from_dict(g) == Dinov2Config.vit_g14() == Dinov2Config.preset("facebook/dinov2-giant")
    with pytest.raises(ValueError, match="use_rope"):
        Dinov2Config.from_dict({"model_type": "dinov2", "use_rope": True})
    with pytest.raises(ValueError, match="model_type"):
        Dinov2Config.from_dict({"model_type": "vit"})
    with pytest.raises(ValueError, match="hidden_act"):
        Dinov2Config.from_dict({"model_type": "dinov2", "hidden_act": "mish"})
    with pytest.raises(ValueError, match="num_register_tokens"):
        Dinov2Config(num_register_tokens=4)
    with pytest.raises(KeyError, match="dinov2-huge"):
        Dinov2Config.preset("dinov2-huge")


@pytest.mark.parametrize("preset", ["dinov2-small", "dinov2-with-registers-base",
                                    "dinov2-large", "dinov2-with-registers-giant"])
def test_preset_parameter_counts(preset):
    """Each preset builds the architecture transformers builds from the same config.json (counted
    on torch's meta device and our abstract model: nothing is allocated or downloaded)."""
    config = Dinov2Config.preset(preset)
    raw = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        if config.with_registers:
            ref = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**raw))
        else:
            ref = transformers.Dinov2Model(transformers.Dinov2Config(**raw))
    abstract = dinov2_class(config).from_config(config, abstract=True)
    assert num_params(abstract) == sum(p.numel() for p in ref.parameters())
    assert len(PRESETS) == 8


def test_wrong_input_raises():
    cfg = Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=8,
                       patch_size=4)
    model = Dinov2Model.from_config(cfg, abstract=True)  # the checks run before any compute
    with pytest.raises(ValueError, match="expected"):
        model(jnp.zeros((1, 3, 8, 8)))  # NCHW
    with pytest.raises(ValueError, match="expected"):
        model(jnp.zeros((1, 2, 8, 3)))  # smaller than a patch


def test_host_init_of_a_fresh_tower():
    """The host init that training from scratch uses (the demo trains a small tower): layer
    scales at 1 (not N(0, 1), which would flip residual branches), tokens and positions small,
    registers distinct; the forward pass is finite."""
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                       patch_size=7, num_register_tokens=2, model_type="dinov2_with_registers")
    model = Dinov2WithRegistersModel.from_config(cfg, abstract=True)
    state = nnx.state(model, nnx.Param)
    values = {}
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        values[key] = host_init(key, tuple(var.get_value().shape), seed=0)
        var.set_value(jnp.asarray(values[key]))
    nnx.update(model, state)
    for key, v in values.items():
        if key[-1] == "lambda1":
            np.testing.assert_array_equal(v, 1.0)
        if key[-1] in ("position_embeddings", "cls_token", "register_tokens"):
            assert 0 < np.abs(v).max() < 0.2, key
    reg = values[("embeddings", "register_tokens")]
    assert not np.array_equal(reg[0, 0], reg[0, 1])
    np.testing.assert_array_equal(values[("embeddings", "mask_token")], 0.0)
    out = _forward(model, jnp.asarray(_images(28, 21)))
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()
