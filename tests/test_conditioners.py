"""Every registered conditioner (models/exemplar.py CONDITIONERS) through the whole framework:
the real training loop on 8 fake devices with FSDP (EMA, CFG dropout), an exact resume, sampling
with classifier-free guidance, and a save / load round trip; plus the contract's own pieces
(preprocessing from the feature extractor config, frozen parts, export refusals)."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbe_jax import sharding as shd
from pbe_jax.checkpoint import restore_numpy
from pbe_jax.configs.pbe import get_config
from pbe_jax.models import CONDITIONERS, PaintByExampleModel
from pbe_jax.models.exemplar import ReferencePreprocess, export_refusal
from pbe_jax.models.paint_by_example import default_feature_extractor_config, param_filters
from pbe_jax.pipeline import PaintByExample
from tests.train_utils import read_metrics, tiny_config

STEPS = 2  # checkpoints at 1 and 2: the resume continues step 1 to 2


def _cfg(name: str, **over):
    return tiny_config(f"demo,conditioner={name}", **{
        "mesh": "data:4,fsdp:2", "train.num_steps": STEPS, "ckpt_every_steps": 1,
        "train.ema_decay": 0.9, "train.cond_drop_prob": 0.5, "train.cond_drop_mode": "sample",
        "data.synthetic_num_images": 8, **over})


def _images():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    ref = rng.integers(0, 256, (20, 24, 3), np.uint8)
    return src, mask, ref


_ABSTRACT = {}


def _abstract(cls, cfg):
    """`cls.from_model_config(cfg.model)` with shape-only params (nnx.eval_shape): the same
    modules, configs and param paths, without the ~25 s of eager random init (each op compiled
    on its own) these structure checks do not need."""
    key = (cls, cfg.model.to_json())  # shared by the tests of the same model (none mutates it)
    if key not in _ABSTRACT:
        _ABSTRACT[key] = nnx.eval_shape(lambda: cls.from_model_config(cfg.model))
    return _ABSTRACT[key]


def _shape(enc, method: str, *args):
    """The shape `enc.<method>(*args)` returns (traced through the encoder's code, nothing run)."""
    graphdef, state = nnx.split(enc)
    return jax.eval_shape(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a), state, *args)


def _params(step_dir):
    return restore_numpy(step_dir / "state", ["params"])["params"]


# The paper's `clip` conditioner goes through the same path in the training, resume, sampling
# and export tests (test_train, test_faults_train, test_sample, test_weights_*): here the others.
E2E = sorted(set(CONDITIONERS) - {"clip"})
# Per conditioner, a smaller tower where its structure allows (less to trace and compile in the
# train step and the sampler): DINOv2 with 1 layer is the same code; the CLIP towers keep 4
# layers, the least with a mapper block ((layers + 1) // 5).
E2E_TOWER = {"dinov2": {"model.image_encoder.num_hidden_layers": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("name", E2E)
def test_conditioner_trains_resumes_samples_and_round_trips(name, tmp_path, monkeypatch):
    from pbe_jax.training.loop import train_and_evaluate

    monkeypatch.setattr(shd, "MIN_SHARD_SIZE", 0)  # tiny model: FSDP-shard every divisible array
    cfg = _cfg(name, **E2E_TOWER.get(name, {}))
    a, b = tmp_path / "a", tmp_path / "b"
    train_and_evaluate(cfg, str(a))
    losses = [r["loss"] for _, r in sorted(read_metrics(str(a)).items())]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    # Resume: a copy of step 1 continued to step 2 equals the uninterrupted run, bit for bit.
    shutil.copytree(a / "checkpoints" / "1", b / "checkpoints" / "1")
    train_and_evaluate(cfg, str(b))
    pa, pb = _params(a / "checkpoints" / str(STEPS)), _params(b / "checkpoints" / str(STEPS))
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    # The conditioner's tower is frozen: it is not among the trained params.
    assert "model" not in pa["image_encoder"] and "uncond_vector" in pa["image_encoder"]

    pipe = PaintByExample.from_pretrained(str(a), use_ema=True)
    assert type(pipe.image_encoder) is CONDITIONERS[name]
    src, mask, ref = _images()
    kw = dict(num_inference_steps=2, seed=3, output_type="np")
    guided = pipe(src, mask, ref, guidance_scale=4.0, **kw)
    plain = pipe(src, mask, ref, guidance_scale=2.0, **kw)
    assert guided.shape == (1, 16, 16, 3) and np.all(np.isfinite(guided))
    assert np.abs(guided - plain).max() > 0  # the unconditional context ran and mattered

    out = pipe.save_pretrained(str(tmp_path / "saved"))
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["image_encoder"][1] == CONDITIONERS[name].__name__
    back = PaintByExample.from_pretrained(out)
    assert type(back.image_encoder) is CONDITIONERS[name]
    assert back.feature_extractor_config == pipe.feature_extractor_config
    s1, s2 = nnx.to_flat_state(nnx.state(pipe)), nnx.to_flat_state(nnx.state(back))
    assert [p for p, _ in s1] == [p for p, _ in s2]
    for (p, v1), (_, v2) in zip(s1, s2):
        np.testing.assert_array_equal(np.asarray(v1.get_value()), np.asarray(v2.get_value()), err_msg=str(p))
    np.testing.assert_array_equal(back(src, mask, ref, guidance_scale=4.0, **kw), guided)


@pytest.mark.parametrize("name", sorted(CONDITIONERS))
def test_each_conditioner_builds_from_its_config_argument(name):
    for variant in ("demo", "sd15", "sd21", "sd21_768"):
        cfg = get_config(f"{variant},conditioner={name}")
        assert cfg.data.reference_size == (32 if variant == "demo" else 224)
    cfg = tiny_config(f"demo,conditioner={name}")
    model = _abstract(PaintByExampleModel, cfg)
    enc = model.image_encoder
    assert type(enc) is CONDITIONERS[name] and type(enc).CONDITIONER == name
    ctx = _shape(enc, "encode", jnp.zeros((2, 32, 32, 3), jnp.uint8))
    assert ctx.shape[0] == 2 and ctx.shape[-1] == cfg.model.unet.cross_attention_dim
    assert _shape(enc, "uncond").shape in ((1, 1, ctx.shape[-1]), (1, *ctx.shape[1:]))
    # The trained / frozen split is the conditioner's: its tower is frozen, the rest trains.
    trainable, frozen = param_filters(False)
    trained = nnx.to_flat_state(nnx.state(model, trainable))
    assert trained and all(str(p[0]) == "unet" or str(p[1]) not in type(enc).FROZEN_PARTS
                           for p, _ in trained)
    tower = [p for p, _ in nnx.to_flat_state(nnx.state(model, frozen)) if str(p[0]) == "image_encoder"]
    assert tower and all(str(p[1]) in type(enc).FROZEN_PARTS for p in tower)


def test_the_encoder_normalises_with_its_feature_extractor_config():
    cfg = tiny_config("demo")
    model = _abstract(PaintByExampleModel, cfg)  # normalising reads the config, not the params
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    fe = default_feature_extractor_config(32)
    want = (x / np.float32(255) - np.float32(fe["image_mean"])) / np.float32(fe["image_std"])
    np.testing.assert_allclose(model.image_encoder.normalize(jnp.asarray(x)), want, atol=1e-6)
    # Another mean / std in the model's config is what the encoder uses.
    other = {**fe, "image_mean": [0.5] * 3, "image_std": [0.25] * 3, "crop_size": {"height": 32, "width": 32}}
    m2 = PaintByExampleModel(model.unet, model.vae, model.image_encoder,
                             scheduler_config=model.scheduler_config, feature_extractor_config=other)
    np.testing.assert_allclose(m2.image_encoder.normalize(jnp.asarray(x)), (x / 255.0 - 0.5) / 0.25,
                               atol=1e-5)
    assert m2.image_encoder.preprocess == ReferencePreprocess.from_feature_extractor_config(other)
    assert m2.feature_extractor_config == other
    with pytest.raises(ValueError, match="image_std"):
        ReferencePreprocess.from_feature_extractor_config({**fe, "image_std": [1.0]})


def test_export_to_diffusers_or_ldm_refuses_other_conditioners(tmp_path):
    for name, cls in CONDITIONERS.items():
        refusal = export_refusal(object.__new__(cls), "diffusers")
        assert (refusal is None) == cls.DIFFUSERS_COMPATIBLE, name
        if refusal:
            assert name in refusal and "PaintByExamplePipeline" in refusal and "save_pretrained" in refusal
    assert export_refusal(object.__new__(CONDITIONERS["clip"]), "ldm") is None
    cfg = tiny_config("demo,conditioner=clip_tokens")
    model = _abstract(PaintByExample, cfg)  # refused before any weight is read
    with pytest.raises(ValueError, match="clip_tokens"):
        model.save_pretrained(str(tmp_path / "x.safetensors"), format="ldm")


DINO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
            patch_size=8)


def test_sd_init_builds_each_conditioner_around_its_pretrained_tower(tmp_path):
    """sd-init: the tower from its pretrained source (bitwise), the trained part fresh (PyTorch
    default init); then `convert --to diffusers` refuses the non-CLIP model, naming why."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from pbe_jax.convert.__main__ import main as convert_main
    from pbe_jax.convert.load import load_pipeline
    from pbe_jax.models import Dinov2Model
    from tests.test_sd2 import UNET2
    from tests.helpers import randomize_fan_in as randomize
    from tests.test_weights_diffusers import VAE

    sd = tmp_path / "sd"
    unet = diffusers.UNet2DConditionModel(**{**UNET2, "in_channels": 4})
    vae = diffusers.AutoencoderKL(**VAE)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(**DINO))
    for i, m in enumerate((unet, vae, dino)):
        randomize(m, 60 + i)
    unet.save_pretrained(sd / "unet")
    vae.save_pretrained(sd / "vae")
    dino.save_pretrained(tmp_path / "dino")
    tower = Dinov2Model.from_pretrained(str(tmp_path / "dino"))
    model_config = {"unet": UNET2, "vae": VAE, "image_encoder": {
        **tower.config.to_dict(), "proj_size": 12, "reference_size": 16,
        "architectures": ["Dinov2ImageEncoder"]}}
    model = load_pipeline("sd-init", str(sd), clip=str(tmp_path / "dino"), model_config=model_config,
                          seed=4, cls=PaintByExample)
    assert type(model.image_encoder) is CONDITIONERS["dinov2"]
    ours, ref = model.image_encoder.model.torch_state_dict(), tower.torch_state_dict()
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    w = model.image_encoder.torch_state_dict()["proj_out.weight"]
    assert w.shape == (12, 16) and 0.5 * 16 ** -0.5 < np.abs(w).max() <= 16 ** -0.5
    assert model.feature_extractor_config["image_processor_type"] == "BitImageProcessor"
    orbax = model.save_pretrained(str(tmp_path / "orbax"), format="orbax")
    for to, dst in (("diffusers", tmp_path / "d"), ("ldm", tmp_path / "m.safetensors")):
        assert convert_main(["--from", "orbax", "--src", orbax, "--to", to, "--dst", str(dst),
                             "--no-progress"]) == 2
        assert not dst.exists() or not any(dst.iterdir())  # nothing written
