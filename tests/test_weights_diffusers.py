"""diffusers-format weights: a tiny random diffusers `PaintByExamplePipeline` -> our
`PaintByExample.from_pretrained` -> `save_pretrained` -> diffusers loads every component with
no missing/unexpected keys and bitwise-equal tensors; the assembled diffusers pipeline runs on
the export. Corrupted files fail naming the problem.

The tiny-pipeline helpers here are shared by the other `test_weights_*` files.
"""
import json
import os
import pickle
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, PaintByExamplePipeline, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import CheckpointMismatchError, param_leaves
from pbe_jax.pipeline import PaintByExample
from tests.helpers import randomize_fan_in

# ---------------------------------------------------------------------------- tiny pipeline

# Fantasy-Studio/Paint-by-Example's model_index.json on the Hub (what an export must write).
MODEL_INDEX = {
    "_class_name": "PaintByExamplePipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

UNET = dict(block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
            attention_head_dim=2, norm_num_groups=4, in_channels=9, out_channels=4, sample_size=8)
VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=16)
# 4 CLIP layers -> (4 + 1) // 5 = 1 mapper block; projection_dim = proj_size = cross_attention_dim
CLIP = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
            image_size=16, patch_size=8, projection_dim=12, hidden_act="quick_gelu")
IMAGE = 16
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "image_encoder": "model"}
TORCH_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                 "image_encoder": PaintByExampleImageEncoder}


def feature_extractor():
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(crop_size=IMAGE, size=IMAGE)


def tiny_pipeline(seed: int = 0) -> PaintByExamplePipeline:
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    enc = PaintByExampleImageEncoder(transformers.CLIPVisionConfig(**CLIP), proj_size=CLIP["projection_dim"])
    for i, m in enumerate((unet, vae, enc)):
        randomize_fan_in(m, seed + i)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return PaintByExamplePipeline(vae=vae.eval(), image_encoder=enc.eval(), unet=unet.eval(), scheduler=sched,
                                  feature_extractor=feature_extractor(), safety_checker=None,
                                  requires_safety_checker=False)


def model_configs() -> dict:
    """The tiny architecture as `{'unet', 'vae', 'image_encoder'}` config.json dicts."""
    return {"unet": dict(UNET), "vae": dict(VAE), "image_encoder": dict(CLIP)}


def numpy_sd(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}


def ours_vs_torch(model, pipe, comp: str) -> None:
    """Our component's params, as a torch state dict, equal the torch component's (transformers 5
    names the encoder's tower `model.embeddings.*`, we `model.vision_model.embeddings.*`)."""
    ref = getattr(model, comp).rename_legacy_keys(numpy_sd(getattr(pipe, comp)))
    assert_state_dicts_equal(getattr(model, comp).torch_state_dict(), ref, comp)


def assert_state_dicts_equal(ours: dict, ref: dict, what: str) -> None:
    """Same keys, bitwise-equal tensors (dtype included)."""
    assert set(ours) == set(ref), f"{what}: keys differ: {sorted(set(ours) ^ set(ref))[:10]}"
    bad = [k for k in ref if ours[k].dtype != ref[k].dtype or not np.array_equal(ours[k], ref[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def load_component_torch(path: str, comp: str, **kw):
    """A component of an exported repo with its own diffusers/transformers class, asserting no
    missing, unexpected or mismatched keys."""
    model, info = TORCH_CLASSES[comp].from_pretrained(path, subfolder=comp, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{comp}: diffusers/transformers loading info {problems}"
    return model


def assemble_torch(path: str, **kw) -> PaintByExamplePipeline:
    """The few lines that load a pbe_jax export into diffusers >= 0.40 (README)."""
    return PaintByExamplePipeline(
        vae=load_component_torch(path, "vae", **kw),
        image_encoder=load_component_torch(path, "image_encoder", **kw),
        unet=load_component_torch(path, "unet", **kw),
        scheduler=PNDMScheduler.from_pretrained(path, subfolder="scheduler"),
        feature_extractor=type(feature_extractor()).from_pretrained(path, subfolder="feature_extractor"),
        safety_checker=None, requires_safety_checker=False)


def assert_export_equals(path: str, pipe: PaintByExamplePipeline, **kw) -> None:
    for comp in TORCH_CLASSES:
        loaded = load_component_torch(path, comp, **kw)
        assert_state_dicts_equal(numpy_sd(loaded), numpy_sd(getattr(pipe, comp)), comp)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch pipeline, its diffusers save_pretrained dir)."""
    pipe = tiny_pipeline()
    d = str(tmp_path_factory.mktemp("tiny_pbe"))
    pipe.save_pretrained(d)
    return pipe, d


def replicated_place(seen: list):
    """A `place` that records each param path and replicates the array over all devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, arr):
        seen.append(tuple(path))
        return jax.device_put(arr, rep)

    return place, rep


def assert_placed(model, seen: list, sharding) -> None:
    """`place` saw every param path of the PaintByExample module once, and was obeyed."""
    leaves = param_leaves(model)
    assert sorted(map(str, seen)) == sorted(map(str, leaves))
    assert all(v.get_value().sharding == sharding for v in leaves.values())


@pytest.fixture(scope="module")
def loaded(tiny):
    """(our model, report, place-recorded paths, sharding): one load shared by the tests."""
    seen = []
    place, rep = replicated_place(seen)
    model, report = PaintByExample.from_pretrained(tiny[1], return_report=True, place=place)
    return model, report, seen, rep


# ------------------------------------------------------------------------------------ tests


def test_roundtrip_is_bitwise(tiny, loaded, tmp_path):
    pipe, src = tiny
    model, report, _, _ = loaded
    for comp in TORCH_CLASSES:
        assert report.loaded[comp] == len(numpy_sd(getattr(pipe, comp))), comp
        ours_vs_torch(model, pipe, comp)
    out = str(tmp_path / "export")
    model.save_pretrained(out)
    assert_export_equals(out, pipe)
    with open(os.path.join(src, "scheduler", "scheduler_config.json")) as f:
        src_sched = json.load(f)
    assert PNDMScheduler.from_pretrained(out, subfolder="scheduler").config == \
        PNDMScheduler.from_config(src_sched).config
    with open(os.path.join(src, "feature_extractor", "preprocessor_config.json")) as f:
        src_fe = json.load(f)
    with open(os.path.join(out, "feature_extractor", "preprocessor_config.json")) as f:
        assert json.load(f) == src_fe
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == MODEL_INDEX
    assert index["image_encoder"] == ["paint_by_example", "PaintByExampleImageEncoder"]


def test_exported_pipeline_runs_like_the_original(tiny, loaded, tmp_path):
    _, src = tiny
    out = str(tmp_path / "export")
    loaded[0].save_pretrained(out)
    ours = assemble_torch(out)
    # The original, loaded the same way (a freshly built pipeline differs by ~1 ulp after a
    # transformers from_pretrained round trip, with or without pbe_jax in between).
    pipe = assemble_torch(src)
    rs = np.random.RandomState(0)
    from PIL import Image

    img = Image.fromarray(rs.randint(0, 255, (IMAGE, IMAGE, 3), np.uint8))
    ref = Image.fromarray(rs.randint(0, 255, (IMAGE, IMAGE, 3), np.uint8))
    mask = np.zeros((IMAGE, IMAGE), np.uint8)
    mask[4:12, 4:12] = 255
    mask = Image.fromarray(mask)
    kw = dict(example_image=ref, image=img, mask_image=mask, height=IMAGE, width=IMAGE,
              num_inference_steps=1, guidance_scale=5.0, output_type="np")
    got = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    want = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == (1, IMAGE, IMAGE, 3) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


def test_fp16_variant(tmp_path):
    pipe = tiny_pipeline(seed=10)
    pipe.to(dtype=torch.float16)
    src = str(tmp_path / "fp16")
    pipe.save_pretrained(src, variant="fp16")
    assert os.path.isfile(os.path.join(src, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    model = PaintByExample.from_pretrained(src, variant="fp16")
    leaves = param_leaves(model)
    assert all(v.get_value().dtype == np.float32 for v in leaves.values())  # params stay fp32
    out = str(tmp_path / "export")
    model.save_pretrained(out, dtype="fp16", variant="fp16")
    for comp, stem in WEIGHT_FILES.items():
        f = os.path.join(out, comp, f"{stem}.fp16.safetensors")
        assert {a.dtype for a in stio.read_safetensors(f).values()} == {np.dtype(np.float16)}, f
    assert_export_equals(out, pipe, variant="fp16", torch_dtype=torch.float16)


def test_bin_weights_and_no_unpickling(tiny, tmp_path):
    pipe, _ = tiny
    src = str(tmp_path / "bin")
    pipe.save_pretrained(src, safe_serialization=False)
    assert os.path.isfile(os.path.join(src, "unet", "diffusion_pytorch_model.bin"))
    model = PaintByExample.from_pretrained(src)
    for comp in TORCH_CLASSES:
        ours_vs_torch(model, pipe, comp)
    # a pickle that runs code when unpickled is refused (torch.load(weights_only=True))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    with open(os.path.join(src, "unet", "diffusion_pytorch_model.bin"), "wb") as f:
        pickle.dump({"conv_in.weight": Exploit()}, f, protocol=2)
    with pytest.raises(stio.CheckpointFormatError, match="weights_only"):
        PaintByExample.from_pretrained(src)
    assert not marker.exists()


def _copy_with_unet(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    f = os.path.join(dst, "unet", "diffusion_pytorch_model.safetensors")
    sd = {k: np.array(v) for k, v in stio.read_safetensors(f).items()}
    stio.write_safetensors(f, edit(sd))
    return f


def test_wrong_shape_and_dtype_are_named(tiny, tmp_path):
    def edit(sd):
        sd["conv_in.weight"] = sd["conv_in.weight"][:, :4]  # a 4-channel SD conv_in
        sd["conv_out.bias"] = sd["conv_out.bias"].astype(np.int32)
        return sd

    _copy_with_unet(tiny[1], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointMismatchError) as e:
        PaintByExample.from_pretrained(str(tmp_path / "bad"))
    assert "conv_in.weight: checkpoint (8, 4, 3, 3) (as NHWC (3, 3, 4, 8)), model (3, 3, 9, 8)" in str(e.value)
    assert "conv_out.bias: dtype int32, expected a float tensor" in str(e.value)


def test_renamed_key_is_named_and_allow_missing(tiny, tmp_path):
    key = "down_blocks.0.resnets.0.conv1.bias"

    def edit(sd):
        sd[key.replace("conv1", "conv_one")] = sd.pop(key)
        return sd

    _copy_with_unet(tiny[1], str(tmp_path / "renamed"), edit)
    with pytest.raises(CheckpointMismatchError) as e:
        PaintByExample.from_pretrained(str(tmp_path / "renamed"))
    msg = str(e.value)
    assert "1 missing keys: down_blocks.0.resnets.0.conv1.bias" in msg
    assert "1 unexpected keys: down_blocks.0.resnets.0.conv_one.bias" in msg
    # a deleted key is accepted only when allowed, and then reported
    _copy_with_unet(tiny[1], str(tmp_path / "deleted"), lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointMismatchError, match="missing keys: " + key.replace(".", r"\.")):
        PaintByExample.from_pretrained(str(tmp_path / "deleted"))
    model, report = PaintByExample.from_pretrained(str(tmp_path / "deleted"), return_report=True,
                                                   allow_missing=["unet.down_blocks.0.*.conv1.bias"])
    assert report.missing_allowed == ["unet." + key]
    assert model.unet.torch_state_dict()[key].shape == (8,)


def test_truncated_safetensors_is_named(tiny, tmp_path):
    d = str(tmp_path / "trunc")
    shutil.copytree(tiny[1], d)
    f = os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    with pytest.raises(stio.CheckpointFormatError, match="truncated") as e:
        PaintByExample.from_pretrained(d)
    assert f in str(e.value)


def test_model_config_mismatch_lists_fields(tiny):
    cfg = model_configs()
    cfg["unet"]["cross_attention_dim"] = 16
    cfg["image_encoder"]["num_hidden_layers"] = 5
    with pytest.raises(ValueError, match="differs from the model config in 2 fields") as e:
        PaintByExample.from_pretrained(tiny[1], model_config=cfg)
    assert "unet.cross_attention_dim: checkpoint 12, config 16" in str(e.value)
    assert "image_encoder.num_hidden_layers: checkpoint 4, config 5" in str(e.value)


def test_place_puts_every_param(loaded):
    model, _, seen, sharding = loaded
    assert_placed(model, seen, sharding)


def test_hub_download_fetches_only_what_is_read(monkeypatch, tmp_path):
    """A Hub id downloads configs + the one weight file per component that will be read: the
    variant if asked, safetensors over .bin, never the repo's 5 GB `model.ckpt`. The fake Hub
    "downloads" (creates) the listed files that match the patterns it is asked for."""
    import fnmatch

    import huggingface_hub

    from pbe_jax.convert import diffusers_io

    listing = ["model.ckpt", "model_index.json", "scheduler/scheduler_config.json",
               "feature_extractor/preprocessor_config.json",
               "unet/config.json", "unet/diffusion_pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "vae/config.json", "vae/diffusion_pytorch_model.bin",
               "image_encoder/config.json", "image_encoder/pytorch_model.bin",
               "image_encoder/model.fp16.safetensors"]

    def fetched_by(**kw):
        root = tmp_path / f"snap{len(list(tmp_path.iterdir()))}"
        got = set()

        def snapshot_download(repo_id, allow_patterns=None, **_):
            for name in listing:
                if any(fnmatch.fnmatchcase(name, p) for p in allow_patterns):
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    (root / name).write_text("x")
                    got.add(name)
            return str(root)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        assert diffusers_io.resolve_pipeline("org/pbe", **kw) == str(root)
        return got

    assert fetched_by(variant="fp16") == {
        "model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",
        "image_encoder/config.json", "image_encoder/model.fp16.safetensors"}
    got = fetched_by()
    assert "unet/diffusion_pytorch_model.safetensors" in got
    assert "image_encoder/pytorch_model.bin" in got
    assert "model.ckpt" not in got and "unet/diffusion_pytorch_model.bin" not in got
    with pytest.raises(FileNotFoundError, match="not a directory"):
        diffusers_io.resolve_pipeline(str(tmp_path / "nope"))


def test_cli_model_config_forms(tiny):
    from pbe_jax.convert.__main__ import read_model_config

    from_dir = read_model_config(tiny[1])
    assert from_dir["unet"]["in_channels"] == 9
    assert from_dir["image_encoder"]["hidden_size"] == CLIP["hidden_size"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = read_model_config(os.path.join(repo, "configs", "pbe.py") + ":demo")
    assert set(demo) == {"unet", "vae", "image_encoder"} and demo["unet"]["in_channels"] == 9
