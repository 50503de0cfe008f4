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

import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

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


def step_dir(directory: str | os.PathLike, step: int) -> epath.Path:
    """The folder of step `step` in a `checkpoints/` directory (the one place that names it)."""
    return epath.Path(directory) / str(int(step))


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] where two config dicts (`config.to_dict()` or a
    checkpoint's saved config) differ; a field only one has shows `None` on the other side."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif _plain(a) != _plain(b):
            out.append((name, a, b))
    return out


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a config holds tuples, its JSON lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 12) -> str:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:limit])
    return shown + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


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


def _abandoned_write(unraisable) -> bool:
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


def _condense_abandoned_writes() -> None:
    """When one array of an async save fails (a full disk), orbax's save coroutine ends and
    closes its event loop while the other arrays' tensorstore writes are still pending; each of
    them then reports `RuntimeError: Event loop is closed` as an unraisable exception, one
    traceback per array (thousands for a real model) around the one error that matters. Keep
    one log line for all of them (process-wide; other unraisable exceptions are untouched)."""
    previous = sys.unraisablehook
    if getattr(previous, "pbe_jax_condensed", False):
        return
    seen = [0]

    def hook(unraisable):
        if not _abandoned_write(unraisable):
            previous(unraisable)
            return
        seen[0] += 1
        if seen[0] == 1:
            log.warning("a checkpoint save failed: its other pending array writes were abandoned "
                        "(orbax: 'Event loop is closed', reported once); the save's error follows")

    hook.pbe_jax_condensed = True
    sys.unraisablehook = hook


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        _register_array_handler()
        _condense_abandoned_writes()
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

    def restore_latest(self, state_target: Any, frozen_target: Any | None,
                       config: dict | None = None):
        """(step, restored) from the newest checkpoint that restores, or None when there is none;
        newer ones that fail are moved aside (`restore_newest`). Raises `CheckpointError` when
        checkpoints exist but none restores, and, given the run's `config` (a dict), when the
        newest one does not fit the targets' shapes (`check_fits`: a changed model config is
        not corruption, so nothing is moved aside)."""
        dirs = [step_dir(self.directory, s) for s in self.steps()]
        if dirs and config is not None:
            check_fits(dirs[-1], {STATE: state_target, FROZEN: frozen_target}, config)
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
    return [step_dir(ck, s) for s in finished_steps(ck) if (step_dir(ck, s) / STATE).exists()]


def read_config(step_dir: str | os.PathLike) -> dict:
    """The run config saved with a step (a dict, as `config.to_json()` wrote it)."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(epath.Path(step_dir) / CONFIG)


def item_tree(step_dir: str | os.PathLike, item: str) -> Any:
    """The tree structure (metadata) of one item of a step, without reading arrays."""
    with _quiet_absl():  # items of a composite checkpoint have no per-item metadata file
        meta = ocp.PyTreeCheckpointer().metadata(epath.Path(step_dir) / item)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def params_key(step_dir: str | os.PathLike, use_ema: bool | None) -> tuple[str, bool]:
    """Which params of a step's train state to read: ('ema' or 'params', whether the run kept an
    EMA copy). `use_ema=None`: the EMA copy when there is one (what the run's sample grids and
    scores used); True without one is an error naming the step."""
    has_ema = "ema" in item_tree(step_dir, STATE)
    if use_ema and not has_ema:
        raise ValueError(f"{step_dir}: use_ema asked, but the train state has no 'ema' params "
                         "(the run had train.ema_decay = 0)")
    return ("ema" if (has_ema if use_ema is None else use_ema) else "params"), has_ema


def _shapes(tree: Any) -> dict[str, tuple]:
    """{'params.unet.conv_in.kernel': shape} of a tree of arrays / ShapeDtypeStructs / orbax
    metadata."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
            tuple(getattr(x, "shape", ()) or ()) for path, x in flat}


def check_fits(step: str | os.PathLike, targets: dict[str, Any], config: dict) -> None:
    """Raise `CheckpointError` when arrays of checkpoint `step` do not have the shapes of
    `targets` ({item: abstract tree}; None items are skipped), naming the parameters, both
    shapes and the config fields that differ between the checkpoint's saved config and
    `config` (instead of orbax's shape error). Compares the arrays both trees name (a tree
    whose structure differs is left to orbax); does nothing when the step's metadata cannot be
    read (a corrupt step: the restore fallback deals with it)."""
    wrong = []
    try:
        for item, target in targets.items():
            if target is None:
                continue
            have, want = _shapes(item_tree(step, item)), _shapes(target)
            for k in sorted(set(have) & set(want), key=lambda k: (not k.startswith("params."), k)):
                if have[k] != want[k]:
                    wrong.append(f"{item} {k}: checkpoint {have[k]}, config {want[k]}")
        saved = read_config(step) if wrong else {}
    except Exception as e:  # noqa: BLE001 (unreadable metadata: not ours to judge here)
        log.debug("shape check of %s skipped (%s)", step, e)
        return
    if not wrong:
        return
    changes = [c for c in config_changes(saved, config) if c[0].startswith("model.")]
    fields = (f"the config differs from the checkpoint's in {describe_changes(changes)}"
              if changes else "the model config fields are the same (the code's model changed?)")
    raise CheckpointError(
        f"checkpoint {step} does not fit the config: {len(wrong)} array(s) differ, e.g. "
        + "; ".join(wrong[:5]) + f". {fields}. Model shapes cannot change on resume: run with "
        "the checkpoint's values, or start a new run in another --workdir.")


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Orbax logs warnings meant for developers while reading metadata: keep them out."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
