"""`from_pretrained` / `save_pretrained` for every pbe_jax model, in diffusers/transformers format.

A component directory holds `config.json` plus weights: `<name>.safetensors`,
`<name>.<variant>.safetensors` (e.g. fp16), shards with their index (`<name>.safetensors.index.json`,
`<name>.safetensors.index.<variant>.json`), or the legacy pickle `<name>.bin` (read with
`torch.load(weights_only=True)`, the only path that needs torch). `<name>` is
`diffusion_pytorch_model` for diffusers and `model` / `pytorch_model` for transformers.

This module is also the one place that talks to the Hugging Face Hub: `resolve` (a path that
is not a local directory is a Hub repo id, fetched into / read from the cache) and
`push_to_hub` (upload an exported folder).

Each model class sets:
- `config_class`: a dataclass with `from_dict(dict)` (rejects unsupported settings) and
  `to_dict()` (a full `config.json` that the reference library loads);
- `WEIGHTS_NAMES`: file stems to look for, first match wins;
- `IGNORE_KEYS`: globs of checkpoint keys that are known and deliberately unused (buffers);
- optionally `rename_legacy_keys(state_dict)` for old key spellings.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Callable, Iterable, Mapping

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from pbe_jax.convert import safetensors_io as stio
from pbe_jax.convert.torch_layout import (
    LoadReport,
    load_torch_state_dict,
    module_to_torch_state_dict,
)
from pbe_jax.models.abstract import eval_shape as abstract_eval_shape
from pbe_jax.outputs import write_json

# Keyword arguments of every `from_pretrained`, with diffusers' names and meanings.
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def is_hub_id(path: str) -> bool:
    """'org/name' that is not a local path (nor a mistyped one: `_local_part` is None)."""
    return (not os.path.exists(path) and not path.startswith((".", "/", "~"))
            and path.count("/") == 1 and "://" not in path and _local_part(path) is None)


def _local_part(path: str) -> str | None:
    """The longest leading part of `path` that is an existing local folder (`runs` of
    `runs/wrkdir` when `runs/` is here), or None."""
    parts = os.path.normpath(os.path.expanduser(path)).split(os.sep)
    for n in range(len(parts) - 1, 0, -1):
        head = os.sep.join(parts[:n]) or os.sep
        if os.path.isdir(head):
            return head
    return None


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or _local_part(path) is not None


def weight_patterns(stems: Iterable[str], ext: str, variant: str | None) -> list[str]:
    """Glob patterns of the weight files `find_weight_files` reads, for one format / variant:
    the single file, the shard index (ours and diffusers' / transformers' variant spelling
    `<stem>.<ext>.index.<variant>.json`) and the shards."""
    out = []
    for stem in stems:
        s = f"{stem}.{variant}" if variant else stem
        out += [f"{s}.{ext}", f"{s}.{ext}.index.json", f"{s}-*-of-*.{ext}"]
        if variant:
            out.append(f"{stem}.{ext}.index.{variant}.json")
    return out


def _formats(use_safetensors: bool | None) -> tuple[str, ...]:
    if use_safetensors is None:
        return ("safetensors", "bin")
    return ("safetensors",) if use_safetensors else ("bin",)


def resolve(path: str, components: Mapping[str, Iterable[str]], *, extra_patterns: Iterable[str] = (),
            variant: str | None = None, use_safetensors: bool | None = None,
            revision: str | None = None, cache_dir: str | None = None, local_files_only: bool = False,
            token: str | bool | None = None, force_download: bool = False) -> str:
    """The one Hub resolver: a local directory for `path`.

    A local directory is returned as is. A Hub repo id ('org/name') is fetched with
    `huggingface_hub.snapshot_download` and `allow_patterns`, so only the files that will be
    read come down: per component (`{subfolder ('' = the repo root): weight file stems}`), its
    `config.json` and the first weight format that exists, in the order variant safetensors,
    safetensors, variant .bin, .bin (`use_safetensors=True` / False restricts it). Nothing is
    listed first, so `HF_HUB_OFFLINE=1` / `local_files_only=True` work from the cache (a repo
    that is not cached fails naming it). `extra_patterns` come along (scheduler / feature
    extractor configs).
    """
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        if _looks_local(path):
            found = _local_part(path)
            full = os.path.expanduser(path)
            where = (f"{found} exists, {os.path.relpath(full, found)} in it does not" if found
                     else "none of it exists" if os.path.isabs(full) else f"looked for in {os.getcwd()}")
            raise FileNotFoundError(f"{path}: no such folder ({where}); a local path (not a directory), so "
                                    "the Hub was not asked: check the spelling (a Hub repo id is 'org/name')")
        raise FileNotFoundError(f"{path}: not a directory, and not a Hub repo id of the form 'org/name'")
    kw = dict(repo_id=path, revision=revision, cache_dir=cache_dir, token=token,
              local_files_only=local_files_only, force_download=force_download)
    tiers = [(ext, v) for ext in _formats(use_safetensors) for v in ([variant, None] if variant else [None])]
    root = None
    try:
        if extra_patterns:
            root = huggingface_hub.snapshot_download(allow_patterns=list(extra_patterns), **kw)
        for sub, stems in components.items():
            stems, pre = tuple(stems), f"{sub}/" if sub else ""
            incomplete = None
            for ext, v in tiers:
                pats = [f"{pre}config.json"] + [pre + p for p in weight_patterns(stems, ext, v)]
                try:
                    root = huggingface_hub.snapshot_download(allow_patterns=pats, **kw)
                except IncompleteSnapshotError as e:  # offline, and this format is not cached
                    incomplete = incomplete or e
                    continue
                try:
                    find_weight_files(os.path.join(root, sub), stems, v, formats=(ext,))
                    break
                except FileNotFoundError:
                    continue
            else:
                if incomplete is not None:
                    raise incomplete
    except LocalEntryNotFoundError as e:
        where = f" (cache_dir={cache_dir})" if cache_dir else ""
        rev = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{path}{rev}: not in the Hugging Face cache{where} and downloads are off (HF_HUB_OFFLINE=1 "
            f"or local_files_only=True), or the Hub cannot be reached: {e}") from None
    return root


def resolve_dir(path: str, subfolder: str | None = None, stems: Iterable[str] = ("diffusion_pytorch_model",),
                **hub) -> str:
    """A local component directory for `path` (+ `subfolder`); see `resolve`."""
    root = resolve(path, {subfolder or "": stems}, **hub)
    d = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{path}: no subfolder {subfolder!r} (found: {sorted(os.listdir(root))})")
    return d


def find_weight_files(directory: str, names: Iterable[str], variant: str | None = None,
                      formats: Iterable[str] = ("safetensors", "bin")) -> list[str]:
    """The weight file(s) of a component directory, safetensors first, variant first; a shard
    index gives its shards, each of which must lie inside `directory`."""
    names = list(names)
    cands = []
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such component directory")
    for ext in formats:
        for name in names:
            stems = ([f"{name}.{variant}"] if variant else []) + [name]
            for stem in stems:
                cands.append(f"{stem}.{ext}")
                cands.append(f"{stem}.{ext}.index.json")
                if stem != name:
                    cands.append(f"{name}.{ext}.index.{variant}.json")
    for c in cands:
        p = os.path.join(directory, c)
        if not os.path.isfile(p):
            continue
        if c.endswith(".json"):
            return shard_files(p)
        return [p]
    raise FileNotFoundError(
        f"{directory}: no weights file; looked for {cands[:6]}... ; present: {sorted(os.listdir(directory))}"
    )


def shard_files(index_path: str) -> list[str]:
    """The shard files a `*.index.json` names in its `weight_map`, refusing any name that points
    outside the index's folder (an absolute path, `..`). The check is on the names, not on
    resolved links: a Hugging Face cache snapshot is links into its blob store."""
    directory = os.path.dirname(index_path)
    try:
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise stio.CheckpointFormatError(f"{index_path}: not a shard index with a 'weight_map' "
                                         f"object ({type(e).__name__}: {e})") from None
    root = os.path.normpath(os.path.abspath(directory))
    out = []
    for name in names:
        full = os.path.normpath(os.path.join(root, name)) if isinstance(name, str) else ""
        if not isinstance(name, str) or os.path.isabs(name) or not full.startswith(root + os.sep):
            raise stio.CheckpointFormatError(
                f"{index_path}: weight_map names {name!r}, which lies outside {directory} "
                "(shards must be files in the index's own folder)")
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{index_path}: shard {name!r} is missing from {directory}")
        out.append(os.path.join(directory, name))
    return out


class PretrainedMixin:
    """Mixin for NNX models that read/write diffusers/transformers component directories."""

    config_class: Any = None
    WEIGHTS_NAMES: tuple[str, ...] = ("diffusion_pytorch_model",)
    IGNORE_KEYS: tuple[str, ...] = ()

    @classmethod
    def rename_legacy_keys(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return state_dict

    @classmethod
    def load_config(cls, path: str, subfolder: str | None = None, **hub):
        d = resolve_dir(path, subfolder, cls.WEIGHTS_NAMES, **hub)
        cfg_path = os.path.join(d, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{d}: no config.json")
        with open(cfg_path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
        return cls.config_class.from_dict(raw)

    @classmethod
    def from_config(cls, config, *, seed: int = 0, abstract: bool = False, **runtime):
        """A randomly initialised model (or its abstract shapes with `abstract=True`)."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        make = lambda: cls(config, rngs=nnx.Rngs(seed), **runtime)  # noqa: E731
        return abstract_eval_shape(make) if abstract else make()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        allow_missing: Iterable[str] = (),
        place: Callable[[tuple, np.ndarray], jax.Array] | None = None,
        return_report: bool = False,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        **runtime,
    ):
        """Load a component directory (or Hub repo id). `runtime` goes to the constructor
        (`dtype`, `param_dtype`, `attention_impl`, `remat`, ...). `place(path, array)` puts each
        param on devices (e.g. straight into its sharding); default: the default device. Hub
        options (`revision`, `cache_dir`, `local_files_only`, `token`, `force_download`,
        `use_safetensors`) as in diffusers; see `resolve`."""
        d = resolve_dir(path, subfolder, cls.WEIGHTS_NAMES, variant=variant,
                        use_safetensors=use_safetensors, revision=revision, cache_dir=cache_dir,
                        local_files_only=local_files_only, token=token, force_download=force_download)
        config = cls.load_config(d)
        files = find_weight_files(d, cls.WEIGHTS_NAMES, variant, formats=_formats(use_safetensors))
        sd = cls.rename_legacy_keys(stio.read_checkpoint_files(files))
        model = cls.from_config_and_state_dict(
            config, sd, source=", ".join(files), allow_missing=allow_missing, place=place,
            return_report=return_report, **runtime)
        return model

    @classmethod
    def from_config_and_state_dict(cls, config, state_dict, *, source="state dict", allow_missing=(),
                                   place=None, return_report=False, **runtime):
        allow_missing = list(allow_missing)
        # Abstract first: weights go straight from host memory to their devices. Only when gaps
        # are allowed do we need real initial values for the params the checkpoint lacks.
        model = cls.from_config(config, abstract=not allow_missing, **runtime)
        report = load_torch_state_dict(
            model, state_dict, source=source, allow_missing=allow_missing,
            ignore_unexpected=cls.IGNORE_KEYS, place=place)
        return (model, report) if return_report else model

    def torch_state_dict(self, dtype=None) -> dict[str, np.ndarray]:
        """Params as a PyTorch-layout state dict (the keys diffusers/transformers use)."""
        return module_to_torch_state_dict(self, dtype=dtype)

    def load_torch_state_dict(self, state_dict, **kw) -> LoadReport:
        return load_torch_state_dict(self, self.rename_legacy_keys(dict(state_dict)),
                                     ignore_unexpected=self.IGNORE_KEYS, **kw)

    def save_pretrained(self, path: str, *, dtype=None, variant: str | None = None,
                        max_shard_size: int | str | None = None) -> str:
        """Write `config.json` + `<WEIGHTS_NAMES[0]>[.variant].safetensors` (PyTorch layout);
        `dtype` (e.g. np.float16) casts the saved tensors. With `max_shard_size` (bytes or
        '5GB', as diffusers) weights larger than that are split into
        `<stem>[.variant]-0000i-of-0000n.safetensors` plus the index diffusers / transformers
        read (`<stem>.safetensors.index[.variant].json`). Returns the weights file (or index)."""
        os.makedirs(path, exist_ok=True)
        write_json(os.path.join(path, "config.json"), self.config.to_dict(), sort_keys=True)
        return write_weights(path, self.WEIGHTS_NAMES[0], self.torch_state_dict(dtype=dtype),
                             variant=variant, max_shard_size=max_shard_size)


def write_weights(path: str, name: str, state_dict: Mapping[str, np.ndarray], *,
                  variant: str | None = None, max_shard_size: int | str | None = None) -> str:
    """`state_dict` as `<name>[.variant].safetensors`, or sharded (see `save_pretrained`), after
    removing the files an earlier export of the same name / variant left (a stale single file
    would shadow a new index). Returns the weights file or the index."""
    stem = f"{name}.{variant}" if variant else name
    index_name = f"{name}.safetensors.index.{variant}.json" if variant else f"{name}.safetensors.index.json"
    stale = {f"{stem}.safetensors", index_name}
    for f in os.listdir(path):
        if f in stale or fnmatch.fnmatchcase(f, f"{stem}-*-of-*.safetensors"):
            os.remove(os.path.join(path, f))
    split = huggingface_hub.split_state_dict_into_shards_factory(
        dict(sorted(state_dict.items())), get_storage_size=lambda a: int(a.nbytes),
        filename_pattern=stem + "{suffix}.safetensors",
        max_shard_size=max_shard_size if max_shard_size is not None else 2**63)
    for filename, keys in split.filename_to_tensors.items():
        stio.write_safetensors(os.path.join(path, filename), {k: state_dict[k] for k in keys})
    if not split.is_sharded:
        return os.path.join(path, f"{stem}.safetensors")
    index = os.path.join(path, index_name)
    write_json(index, {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename},
               sort_keys=True)
    return index


def push_to_hub(folder: str, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                dry_run: bool = False) -> list[str]:
    """Upload every file of `folder` to the Hub model repo `repo_id` (created if absent) in one
    commit, with huggingface_hub (`token`, `private`, `commit_message`, `create_pr` as in
    diffusers' `push_to_hub`). `dry_run` uploads nothing. Returns the uploaded paths, relative
    to `folder`, sorted."""
    files = sorted(os.path.relpath(os.path.join(d, f), folder)
                   for d, _, names in os.walk(folder) for f in names if not f.endswith(".tmp"))
    if not files:
        raise FileNotFoundError(f"push_to_hub: {folder} holds no files")
    if dry_run:
        return files
    api = huggingface_hub.HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    api.upload_folder(repo_id=repo.repo_id, folder_path=folder, repo_type="model",
                      commit_message=commit_message or "Upload Paint-by-Example model (pbe_jax)",
                      create_pr=create_pr, allow_patterns=files)
    return files


def num_params(module: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def cast_dtype(name_or_dtype) -> Any:
    """'bf16' / 'bfloat16' / 'fp32' / 'float32' / dtype -> jnp dtype."""
    if not isinstance(name_or_dtype, str):
        return name_or_dtype
    table = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32,
             "float32": jnp.float32, "fp16": jnp.float16, "float16": jnp.float16}
    if name_or_dtype not in table:
        raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(table)}")
    return table[name_or_dtype]
