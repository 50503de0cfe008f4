"""Orbax checkpoints of a training run: train state, frozen params, data-iterator state, config.

This module owns the layout; everything that reads a run (resume, export, `from_pretrained`)
asks it. Layout: `WORKDIR/checkpoints/<step>/{state,frozen,data,config}`. Saves are async
(training goes on while files are written); orbax writes to a temporary name and renames when
complete, so a process killed mid-save leaves no half checkpoint under a step name. A checkpoint
that exists but fails to restore (corrupt files) makes `restore_latest` fall back to the
previous one with a warning; it never falls back to a silent fresh start.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

STATE, FROZEN, DATA, CONFIG = "state", "frozen", "data", "config"  # the items of a step


class CheckpointError(RuntimeError):
    pass


def ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = ckpt_dir(workdir)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, frozen: Any, data_state: dict | None, config: dict,
             wait: bool = False) -> None:
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            FROZEN: ocp.args.StandardSave(frozen),
            DATA: ocp.args.JsonSave(data_state or {}),
            CONFIG: ocp.args.JsonSave(config),
        })
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, state_target: Any, frozen_target: Any | None):
        items = {STATE: ocp.args.StandardRestore(state_target), DATA: ocp.args.JsonRestore(),
                 CONFIG: ocp.args.JsonRestore()}
        if frozen_target is not None:
            items[FROZEN] = ocp.args.StandardRestore(frozen_target)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def restore_latest(self, state_target: Any, frozen_target: Any | None):
        """(step, restored) from the newest checkpoint that restores, or None when there is none.
        Raises `CheckpointError` when checkpoints exist but none restores."""
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                return step, self.restore(step, state_target, frozen_target)
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types)
                msg = f"checkpoint {self.directory}/{step} failed to restore: {type(e).__name__}: {e}"
                log.warning("%s; falling back to the previous checkpoint", msg)
                errors.append(msg)
        if errors:
            raise CheckpointError("no checkpoint in the workdir restores:\n" + "\n".join(errors))
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------------------
# Reading a run without a model (export, from_pretrained): host numpy, only the items asked for
# ------------------------------------------------------------------------------------------


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """Step numbers of the finished checkpoints in a `checkpoints/` directory. Orbax writes to
    `<step>.orbax-checkpoint-tmp-*` and renames when complete: only plain integer names count."""
    d = epath.Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def is_step_dir(path: str | os.PathLike) -> bool:
    p = epath.Path(path)
    return (p / STATE).exists() and (p / CONFIG).exists()


def training_steps(path: str | os.PathLike) -> list[epath.Path]:
    """The step directories of a training run, oldest first: `path` is a workdir, its
    `checkpoints/` directory, or one step directory (then just that one)."""
    p = epath.Path(path)
    if is_step_dir(p):
        return [p]
    ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    return [ck / str(s) for s in finished_steps(ck) if (ck / str(s) / STATE).exists()]


def read_config(step_dir: str | os.PathLike) -> dict:
    """The run config saved with a step (a dict, as `config.to_json()` wrote it)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(epath.Path(step_dir) / CONFIG)


def item_tree(step_dir: str | os.PathLike, item: str) -> Any:
    """The tree structure (metadata) of one item of a step, without reading arrays."""
    meta = ocp.PyTreeCheckpointer().metadata(epath.Path(step_dir) / item)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def restore_numpy(directory: str | os.PathLike, keys: Iterable[str] | None = None) -> dict:
    """An orbax PyTree item (a step's `state` / `frozen`, or a params checkpoint) as nested
    dicts of host numpy arrays; with `keys`, only those top-level entries are read (never the
    optimizer state when only params are wanted)."""
    directory = epath.Path(directory)
    ckptr = ocp.PyTreeCheckpointer()
    # orbax logs a warning for items saved inside a composite checkpoint (no per-item metadata).
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        meta = ckptr.metadata(directory)
        meta = getattr(meta, "item_metadata", meta)
        tree = getattr(meta, "tree", meta)
        if keys is not None:
            keys = list(keys)
            absent = [k for k in keys if k not in tree]
            if absent:
                raise KeyError(f"{directory}: no item {absent} (has {sorted(tree)})")
            tree = {k: tree[k] for k in keys}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=args, partial_restore=keys is not None))
    finally:
        absl_log.setLevel(level)
