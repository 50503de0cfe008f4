"""The Hub: loading from a Hugging Face cache offline, diffusers' `from_pretrained` keywords,
sharded weights, the model card and `push_to_hub` (never over the network: the cache is built
here in huggingface_hub's layout, uploads are a dry run or a fake `HfApi`).

The cache layout (what `snapshot_download` writes and reads):
  CACHE/models--org--name/blobs/<sha256>                      file contents
  CACHE/models--org--name/snapshots/<commit>/<repo path>      links into blobs/
  CACHE/models--org--name/refs/<branch or tag>                the commit it points to
"""
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.load import load_scheduler_config
from pbe_jax.convert.model_card import CardInfo, card_info, read_metrics
from pbe_jax.models import hub
from pbe_jax.models.clip import CLIPVisionModel
from pbe_jax.models.unet import UNet2DConditionModel
from pbe_jax.pipeline import PaintByExample
from tests.test_weights_diffusers import (
    TORCH_CLASSES,
    assert_export_equals,
    assert_state_dicts_equal,
    numpy_sd,
    ours_vs_torch,
    tiny_pipeline,
)
from tests.train_utils import REPO, subprocess_env

REPO_ID = "org/tiny-pbe"
MAIN = "a" * 40  # commit hashes of the two cached revisions
OTHER = "b" * 40
PARTIAL = "c" * 40
BIN_NAMES = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
             "image_encoder": "pytorch_model.bin"}


def put_in_cache(src: str, cache: str, repo_id: str, commit: str, refs: tuple[str, ...] = ("main",),
                 listing: tuple[str, ...] = ()) -> str:
    """Copy the folder `src` into the Hugging Face cache `cache` as revision `commit` of model
    repo `repo_id` (blobs + snapshot links + refs), as huggingface_hub would have downloaded it.
    With `listing`, also the cached tree listing of the commit (`trees/<commit>.json`, written
    by an online `snapshot_download`): the repo holds these files, `src`'s and more."""
    storage = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    files = []
    for d, _, names in os.walk(src):
        for name in names:
            rel = os.path.relpath(os.path.join(d, name), src)
            files.append(rel)
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            with open(blob, "wb") as f:
                f.write(data)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if listing:
        entries = {p: TreeCacheEntry(size=1, blob_id=hashlib.sha1(p.encode()).hexdigest())
                   for p in {*files, *listing}}
        write_tree_cache(storage, commit, entries)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(storage, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipeline(seed=30), tiny_pipeline(seed=40)


@pytest.fixture(scope="module")
def cache(pipes, tmp_path_factory):
    """A cache holding REPO_ID at two revisions: MAIN (refs main; safetensors from pipes[0] and
    .bin weights from pipes[1]) and OTHER (tag v2; safetensors from pipes[1])."""
    root = tmp_path_factory.mktemp("hf")
    cache = str(root / "cache")
    main = str(root / "main")
    pipes[0].save_pretrained(main)
    for comp, stem in BIN_NAMES.items():  # (transformers 5 no longer writes .bin itself)
        torch.save(getattr(pipes[1], comp).state_dict(), os.path.join(main, comp, stem))
    put_in_cache(main, cache, REPO_ID, MAIN)
    other = str(root / "other")
    pipes[1].save_pretrained(other)
    put_in_cache(other, cache, REPO_ID, OTHER, refs=("v2",))
    # PARTIAL (branch 'partial'): the repo has safetensors and .bin weights, an earlier download
    # fetched only the .bin ones (pipes[1]'s) and the configs
    partial = str(root / "partial")
    shutil.copytree(other, partial)
    listing = []
    for comp, stem in BIN_NAMES.items():
        for name in os.listdir(os.path.join(partial, comp)):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(partial, comp, name))
                listing.append(f"{comp}/{name}")
        torch.save(getattr(pipes[1], comp).state_dict(), os.path.join(partial, comp, stem))
    put_in_cache(partial, cache, REPO_ID, PARTIAL, refs=("partial",), listing=tuple(listing))
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it, and any socket connection fails the test."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_offline_env_loads_from_cache(pipes, cache):
    """The deployment case, in a fresh process: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set in the
    environment, an endpoint that cannot be reached; `from_pretrained(repo_id)` loads the cache."""
    code = ("import numpy as np; from pbe_jax.pipeline import PaintByExample; "
            f"m = PaintByExample.from_pretrained({REPO_ID!r}); "
            "sd = m.unet.torch_state_dict(); "
            "print('SUM', float(sum(np.abs(v).sum() for v in sd.values())))")
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "HF_HOME": cache,
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = float(r.stdout.split("SUM")[-1])
    want = float(sum(np.abs(v).sum() for v in numpy_sd(pipes[0].unet).values()))
    assert got == pytest.approx(want, rel=1e-6)


def _unet(pipe) -> dict:
    return numpy_sd(pipe.unet)


def test_offline_keywords(pipes, cache, offline):
    """Each keyword through the whole pipeline once, then through one component's
    `from_pretrained` (the same resolver, a quarter of the loading)."""
    # the cache knows the repo also has safetensors, but holds only the .bin: those are read
    model = PaintByExample.from_pretrained(REPO_ID, cache_dir=cache, revision="partial")
    for comp in TORCH_CLASSES:
        ours_vs_torch(model, pipes[1], comp)
    load = functools.partial(UNet2DConditionModel.from_pretrained, REPO_ID, subfolder="unet", cache_dir=cache)
    assert_state_dicts_equal(load().torch_state_dict(), _unet(pipes[0]), "main")
    # revision: a branch, a tag or a commit picks the snapshot
    assert_state_dicts_equal(load(revision="v2").torch_state_dict(), _unet(pipes[1]), "tag")
    assert_state_dicts_equal(load(revision=OTHER).torch_state_dict(), _unet(pipes[1]), "commit")
    # use_safetensors=False reads the .bin files (pipes[1]'s weights in MAIN), True the safetensors
    assert_state_dicts_equal(load(use_safetensors=False).torch_state_dict(), _unet(pipes[1]), ".bin")
    assert_state_dicts_equal(load(use_safetensors=True).torch_state_dict(), _unet(pipes[0]), "safetensors")
    with pytest.raises(FileNotFoundError, match=r"org/tiny-pbe at revision 'partial': not in the .*"
                                                r"unet/diffusion_pytorch_model.safetensors"):
        load(revision="partial", use_safetensors=True)
    # the scheduler config alone, from the cache
    assert load_scheduler_config("diffusers", REPO_ID, cache_dir=cache)["_class_name"] == "PNDMScheduler"
    # not cached: a clear error naming the repo (and the revision)
    with pytest.raises(FileNotFoundError, match=r"org/absent: not in the Hugging Face cache"):
        PaintByExample.from_pretrained("org/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"org/tiny-pbe at revision 'v3': not in the Hugging Face"):
        PaintByExample.from_pretrained(REPO_ID, cache_dir=cache, revision="v3")
    with pytest.raises(TypeError, match="unexpected keyword"):
        PaintByExample.from_pretrained(REPO_ID, cache_dir=cache, mirror="x")


def test_local_files_only_without_offline_mode(pipes, cache, tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = PaintByExample.from_pretrained(REPO_ID, cache_dir=cache, local_files_only=True)
    ours_vs_torch(model, pipes[0], "image_encoder")
    with pytest.raises(FileNotFoundError, match=r"org/tiny-pbe: not in the Hugging Face cache \(cache_dir="):
        PaintByExample.from_pretrained(REPO_ID, cache_dir=str(tmp_path / "empty"), local_files_only=True)


def test_hub_keywords_reach_snapshot_download(cache, monkeypatch):
    """`token` and `force_download` (which need the network to mean anything) reach every
    `snapshot_download` call, with the other keywords, and nothing else does the fetching."""
    calls = []
    snapshot = os.path.join(cache, "models--org--tiny-pbe", "snapshots", MAIN)

    def snapshot_download(repo_id, **kw):
        calls.append(dict(kw, repo_id=repo_id))
        return snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    PaintByExample.from_pretrained(REPO_ID, token="hf_secret", force_download=True, revision="main",
                                   cache_dir="/somewhere", variant="fp16")
    assert calls and all(c["token"] == "hf_secret" and c["force_download"] and c["revision"] == "main"
                         and c["cache_dir"] == "/somewhere" and c["repo_id"] == REPO_ID for c in calls)
    assert all(c["allow_patterns"] for c in calls)  # never the whole repo


def test_bare_clip_id_fetches_one_format(tmp_path, monkeypatch):
    """`--clip openai/clip-vit-large-patch14` must not download the TF, Flax, .bin and fp16
    copies that the CLIP repos also hold: only config.json and model.safetensors."""
    listing = ["config.json", "preprocessor_config.json", "tokenizer.json", "vocab.json", "merges.txt",
               "pytorch_model.bin", "model.safetensors", "model.fp16.safetensors", "tf_model.h5",
               "flax_model.msgpack", "README.md"]
    got = set()

    def snapshot_download(repo_id, allow_patterns=None, **_):
        for name in listing:
            if any(fnmatch.fnmatchcase(name, p) for p in allow_patterns):
                (tmp_path / name).write_text("x")
                got.add(name)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub.resolve("openai/clip-vit-large-patch14", {"": CLIPVisionModel.WEIGHTS_NAMES})
    assert got == {"config.json", "model.safetensors"}


def test_sharded_export_loads_in_diffusers_and_here(pipes, tmp_path):
    model = PaintByExample.from_pretrained(_saved(pipes[0], tmp_path / "src"))
    out = str(tmp_path / "sharded")
    model.save_pretrained(out, max_shard_size=20_000)
    names = sorted(os.listdir(os.path.join(out, "unet")))
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    shards = [n for n in names if fnmatch.fnmatch(n, "diffusion_pytorch_model-*-of-*.safetensors")]
    assert len(shards) > 1 and "diffusion_pytorch_model.safetensors" not in names
    assert any(fnmatch.fnmatch(n, "model-*-of-*.safetensors") for n in os.listdir(os.path.join(out, "image_encoder")))
    assert_export_equals(out, pipes[0])  # diffusers / transformers read the shards
    back = PaintByExample.from_pretrained(out)
    for comp in TORCH_CLASSES:
        ours_vs_torch(back, pipes[0], comp)
    # a variant, sharded: diffusers' spelling of the index (`*.safetensors.index.fp16.json`)
    model.save_pretrained(out, max_shard_size=20_000, variant="fp16", dtype="fp16")
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors.index.fp16.json"))
    assert_export_equals(out, tiny_pipeline(seed=30).to(torch.float16), variant="fp16",
                         torch_dtype=torch.float16)
    half = PaintByExample.from_pretrained(out, variant="fp16")
    want = {k: v.astype(np.float16) for k, v in model.unet.torch_state_dict().items()}
    assert_state_dicts_equal(half.unet.torch_state_dict(np.float16), want, "unet fp16")
    # saving again unsharded removes the stale shards (else the index would still be read)
    model.save_pretrained(out)
    plain = [n for n in os.listdir(os.path.join(out, "vae")) if ".fp16" not in n]
    assert sorted(plain) == ["config.json", "diffusion_pytorch_model.safetensors"]


def _saved(pipe, path) -> str:
    pipe.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/tmp/abs.safetensors",
                                    "sub/../../outside.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(pipes, tmp_path, target):
    d = tmp_path / "repo"
    unet = d / "unet"
    unet.mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"")
    sd = numpy_sd(pipes[0].unet)
    stio.write_safetensors(str(unet / "diffusion_pytorch_model-00001-of-00001.safetensors"), sd)
    weight_map = {k: "diffusion_pytorch_model-00001-of-00001.safetensors" for k in sd}
    weight_map[next(iter(sd))] = target
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(stio.CheckpointFormatError, match="lies outside") as e:
        hub.find_weight_files(str(unet), ["diffusion_pytorch_model"])
    assert target in str(e.value) and "index.json" in str(e.value)


def test_model_card_and_push_dry_run(pipes, tmp_path, monkeypatch):
    model = PaintByExample.from_pretrained(_saved(pipes[0], tmp_path / "src"))
    train_config = {"seed": 3, "train": {"num_steps": 1234, "lr": 1e-5, "batch_size": 32},
                    "data": {"source": "folder", "resolution": 512},
                    "init_from": {"format": "diffusers", "path": "Fantasy-Studio/Paint-by-Example"}}
    info = CardInfo(source="runs/mine", source_format="orbax", base_model="Fantasy-Studio/Paint-by-Example",
                    train_config=train_config, step=1234, use_ema=True, metrics={"fid": 3.25, "clip_score": 84.5},
                    metrics_source="runs/mine/metrics.jsonl")
    out = str(tmp_path / "export")
    model.save_pretrained(out, card=info, repo_id="me/pbe-mine")
    card = huggingface_hub.ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.base_model == "Fantasy-Studio/Paint-by-Example"
    assert card.data.pipeline_tag == "image-to-image" and card.data.library_name == "diffusers"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("fid", 3.25), ("clip_score", 84.5)}
    text = card.text
    assert '| `train.num_steps` | `1234` |' in text and "step 1234 of the run (EMA weights)" in text
    assert json.dumps(train_config, indent=2, sort_keys=True) in text  # the full config
    assert "| FID | 3.25 |" in text
    assert 'PaintByExample.from_pretrained("me/pbe-mine")' in text
    assert 'UNet2DConditionModel.from_pretrained(d, subfolder="unet")' in text
    # the dry run lists every file; a fake HfApi sees the same files uploaded in one commit
    files = hub.push_to_hub(out, "me/pbe-mine", dry_run=True)
    assert "README.md" in files and "model_index.json" in files
    assert "unet/diffusion_pytorch_model.safetensors" in files and "scheduler/scheduler_config.json" in files
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.save_pretrained(out, push_to_hub=True, repo_id="me/pbe-mine", token="hf_t", private=True)
    assert calls[0] == ("init", "hf_t")
    assert calls[1][:2] == ("create_repo", "me/pbe-mine") and calls[1][2]["private"] is True
    assert calls[2][1]["repo_id"] == "me/pbe-mine" and calls[2][1]["folder_path"] == out
    assert sorted(calls[2][1]["allow_patterns"]) == files


def test_card_reads_the_run(tmp_path):
    """`card_info` of a training workdir takes the newest eval row of metrics.jsonl, else an
    evaluate metrics.json below the workdir."""
    wd = tmp_path / "run"
    (wd / "eval").mkdir(parents=True)
    (wd / "eval" / "metrics.json").write_text(json.dumps({"metrics": {"fid": 5.0, "qs": 70.0}}))
    assert read_metrics(str(wd)) == ({"fid": 5.0, "qs": 70.0}, str(wd / "eval" / "metrics.json"))
    rows = [{"step": 10, "loss": 0.1, "eval/fid": 9.0}, {"step": 20, "eval/fid": 7.0, "eval/clip_score": 80.0},
            {"step": 25, "loss": 0.05}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "lo')
    metrics, src = read_metrics(str(wd))
    assert metrics == {"fid": 7.0, "clip_score": 80.0} and src.endswith("(step 20)")
    info = card_info("diffusers", "Fantasy-Studio/Paint-by-Example")
    assert info.base_model == "Fantasy-Studio/Paint-by-Example" and info.train_config is None


def test_card_of_a_training_run(pipes, tmp_path):
    """`convert --from orbax` of a training workdir: the card carries the run's config, step,
    EMA choice and the evaluation metrics of its metrics.jsonl."""
    from pbe_jax.convert.__main__ import main as convert_main
    from tests.test_weights_orbax import _train_checkpoint

    model = PaintByExample.from_pretrained(_saved(pipes[0], tmp_path / "src"))
    workdir = str(tmp_path / "run")
    _train_checkpoint(model, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 7, "loss": 0.1, "eval/clip_score": 81.5, "eval/fid": 12.25}) + "\n")
    out = str(tmp_path / "export")
    assert convert_main(["--from", "orbax", "--src", workdir, "--use-ema", "--to", "diffusers", "--dst", out,
                         "--no-progress"]) == 0
    card = huggingface_hub.ModelCard.load(os.path.join(out, "README.md"))
    assert "exported from step 7 of the run (EMA weights)" in card.text
    assert '"beta_schedule": "linear"' in card.text and "| FID | 12.25 |" in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"clip_score": 81.5, "fid": 12.25}
