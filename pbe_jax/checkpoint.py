"""Orbax checkpoints of a training run: train state, frozen params, data-iterator state, config.

This module owns the layout; everything that reads a run (resume, export, `from_pretrained`)
asks it. Layout: `WORKDIR/checkpoints/<step>/{state,frozen,data,config}`. Saves are async
(training goes on while files are written); orbax writes to a temporary name and renames when
complete, so a process killed mid-save leaves no half checkpoint under a step name.

Faults:
- A step that exists but fails to restore (corrupt files) is moved aside to
  `<step>.corrupt-<UTC time>` (never deleted) and reported, and the previous step is used:
  `restore_newest` is the one fallback that training, `from_pretrained` and `convert` apply.
  Moved-aside steps no longer count as steps, so training saves that step number again
  instead of crash-looping on "step already exists". When no step restores nothing is moved
  (a failure common to every step, e.g. a changed model config, is not corruption) and
  `CheckpointError` lists each step's error: never a silent fresh start.
- A save that fails (disk full, permissions) raises `CheckpointError` naming the step and the
  checkpoints still intact, as soon as its background write fails (`Checkpointer.check`, called
  every training step), not at the next save; older checkpoints are only deleted after a newer
  one is complete.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STATE, FROZEN, DATA, CONFIG = "state", "frozen", "data", "config"  # the items of a step
CORRUPT = ".corrupt-"  # `<step>.corrupt-<time>`: a step that failed to restore, moved aside

T = TypeVar("T")


class CheckpointError(RuntimeError):
    pass


def ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


# Replica-parallel saving (orbax's default off GPUs) splits every replicated array into one
# slice per replica, each cut on the device by a program of its own (shape and offset): the
# first save of the demo's 900 arrays on 8 devices compiled for 26 s and held training that
# long. One process writes every slice anyway, so it only pays off across hosts, and only for
# slices big enough to outweigh their compile.
REPLICA_PARALLEL_MIN_BYTES = 4 * 2**20


def _register_array_handler() -> None:
    """Register orbax's jax.Array handler with the settings above (process-wide)."""
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        _register_array_handler()
        self.directory = ckpt_dir(workdir)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self._writing: int | None = None  # the step whose async write may still be running
        self._error: str | None = None  # a failed save, once reported

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, frozen: Any, data_state: dict | None, config: dict,
             wait: bool = False) -> None:
        """Start writing step `step` (and wait until it is complete with `wait`). Raises
        `CheckpointError` when this save, or the previous one, fails."""
        self.check(block=True)
        items = {STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state or {}),
                 CONFIG: ocp.args.JsonSave(config)}
        if frozen is not None:  # None: a LoRA run, whose base is reloaded from its source
            items[FROZEN] = ocp.args.StandardSave(frozen)
        args = ocp.args.Composite(**items)
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types)
            raise CheckpointError(self._failed(step, e)) from e
        self._writing = step
        if wait:
            self.check(block=True)

    def check(self, block: bool = False) -> None:
        """Raise `CheckpointError` if the last save's background write failed. Cheap unless
        `block` (then it waits for the write): call it every step, so a full disk or a lost
        permission stops the run while that save is written, not one save interval later."""
        if self._writing is None or (not block and self.manager.is_saving_in_progress()):
            return
        step, self._writing = self._writing, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(self._failed(step, e)) from e

    def _failed(self, step: int, e: Exception) -> str:
        intact = [s for s in finished_steps(self.directory) if s != step]
        self._error = (
            f"checkpoint {self.directory}/{step} failed to write ({type(e).__name__}: {e}); the "
            f"checkpoints intact are {intact or 'none'}: free space or fix permissions in "
            f"{self.directory} and rerun to resume from {f'step {intact[-1]}' if intact else 'the start'}")
        return self._error

    def restore(self, step: int, state_target: Any, frozen_target: Any | None):
        items = {STATE: ocp.args.StandardRestore(state_target), DATA: ocp.args.JsonRestore(),
                 CONFIG: ocp.args.JsonRestore()}
        if frozen_target is not None:
            items[FROZEN] = ocp.args.StandardRestore(frozen_target)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def restore_latest(self, state_target: Any, frozen_target: Any | None):
        """(step, restored) from the newest checkpoint that restores, or None when there is none;
        newer ones that fail are moved aside (`restore_newest`). Raises `CheckpointError` when
        checkpoints exist but none restores."""
        dirs = [epath.Path(self.directory) / str(s) for s in self.steps()]
        found = restore_newest(dirs, lambda d: self.restore(int(d.name), state_target, frozen_target))
        self.manager.reload()  # forget the steps moved aside: their numbers are free again
        return None if found is None else (int(found[0].name), found[1])

    def close(self) -> None:
        """Wait for the last save (`CheckpointError` if it failed) and stop orbax's threads."""
        try:
            self.check(block=True)
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                if self._error is None:  # else: the failed save, already raised by `check`
                    raise


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (a corrupt shard may fail only its readers)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def move_aside(step_dir: epath.Path, why: str) -> epath.Path | None:
    """Rename a step that fails to restore to `<step>.corrupt-<UTC time>` (process 0; never
    deleted) and log why. Returns the new path, or None when it could not be renamed (a
    read-only run: the fallback still skips it)."""
    dest = step_dir.parent / f"{step_dir.name}{CORRUPT}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    moved = None
    if jax.process_index() == 0:
        try:
            step_dir.rename(dest)
            moved = dest
            log.error("checkpoint %s does not restore (%s): moved aside to %s; delete it once "
                      "you no longer need it", step_dir, why, dest)
        except OSError as e:
            log.error("checkpoint %s does not restore (%s) and cannot be moved aside (%s); "
                      "skipping it", step_dir, why, e)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pbe_jax.checkpoint.move_aside {step_dir}")
    return moved


def restore_newest(step_dirs: list[epath.Path], read: Callable[[epath.Path], T]
                   ) -> tuple[epath.Path, T] | None:
    """The fallback every reader of a run applies: `read(step_dir)` on the step directories
    (oldest first), newest first, until one succeeds on every process -> (that dir, its
    value); None when there are none. The newer steps that failed are moved aside
    (`move_aside`). When none reads, nothing is moved and `CheckpointError` lists each error."""
    failed: list[tuple[epath.Path, str]] = []
    for d in reversed(step_dirs):
        value, why = None, "failed on another process"
        try:
            value, ok = read(d), True
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types)
            ok, why = False, f"{type(e).__name__}: {e}"
        if not _all_processes(ok):
            failed.append((d, why))
            continue
        for bad, why in failed:
            move_aside(bad, why)
        if failed:
            log.warning("using %s instead of %s", d, failed[0][0])
        return d, value
    if failed:
        raise CheckpointError("no checkpoint of the run restores (nothing was moved aside):\n"
                              + "\n".join(f"  {d}: {why}" for d, why in failed))
    return None


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
