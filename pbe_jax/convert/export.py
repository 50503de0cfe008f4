"""Whole exports: `python -m pbe_jax.convert` writes an export (a diffusers folder, an orbax params
checkpoint, one LDM file) as a whole, or not at all.

    with Destination(dst, "diffusers", overwrite=False) as dest:   # checks, then holds the lock
        model = load_pipeline(...)                                  # the slow part
        dest.write(model, dtype=..., card=...)                     # temp sibling, then rename

- **Checked before any work**: a `dst` that is, or is inside, a training workdir is refused (an
  orbax export there would make `--model=WORKDIR` load it instead of the run's newest step); a
  `dst` that already holds files is refused unless `overwrite`, and even then only when it holds
  a previous export (a diffusers repo or an orbax params checkpoint), never an unrelated folder;
  an LDM `dst` must be a file name ending in `.safetensors` / `.ckpt`.
- **One writer**: the `--dst` lock (`pbe_jax.locks`) is held from the checks to the end (an LDM
  file's lock is its folder's).
- **Whole**: the export is written to a hidden temporary sibling (`.NAME.export-tmp-XXXX`) and
  renamed into place at the end; an old export is renamed aside first (`.NAME.export-old-XXXX`)
  and deleted after the new one is in place. An exception (SIGTERM included, where the command
  turns it into one) removes the temporary sibling and leaves `dst` as it was; a SIGKILL leaves
  the sibling, which the next export to the same `dst` deletes.

Remote `dst` (`gs://...`): object stores have no atomic rename of a folder, so an export there is
written in place (after the same checks and the lock); an interrupted one must be redone.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Any

from etils import epath

from pbe_jax import checkpoint as ckpt
from pbe_jax import locks
from pbe_jax.convert.model_card import CARD_FILE, as_card_info, make_model_card
from pbe_jax.convert.orbax_io import CONFIG_FILE as ORBAX_CONFIG_FILE
from pbe_jax.metrics import METRICS_FILE
from pbe_jax.outputs import atomic_write

log = logging.getLogger(__name__)

LDM_SUFFIXES = (".safetensors", ".ckpt")
TMP_TAG, OLD_TAG = ".export-tmp-", ".export-old-"
# What marks a folder as a previous export that `overwrite` may replace.
EXPORT_MARKERS = ("model_index.json", ORBAX_CONFIG_FILE)


class DestinationError(ValueError):
    """`--dst` cannot take this export (the message says why and what to do)."""


def _path(p: str) -> epath.Path:
    return epath.Path(p) if "://" in p else epath.Path(os.path.abspath(p))


def is_training_workdir(p: epath.Path) -> bool:
    """Whether `p` is a pbe_jax training workdir: it holds training checkpoints
    (`checkpoints/<step>`), a `metrics.jsonl`, or the lock of a live training run."""
    try:
        if not p.is_dir():
            return False
        if (p / METRICS_FILE).exists() or ckpt.is_step_dir(p):
            return True
        if (p / "checkpoints").is_dir() and ckpt.training_steps(p / "checkpoints"):
            return True
    except OSError:  # unreadable: not something we can tell is a run
        return False
    return (locks.read_holder(p) or {}).get("what") == "--workdir"


def enclosing_workdir(path: str) -> epath.Path | None:
    """The training workdir that `path` is or is inside of, or None."""
    p = _path(path)
    for q in (p, *p.parents):
        if is_training_workdir(q):
            return q
    return None


def _contents(p: epath.Path) -> list[str]:
    """What a folder holds, besides our lock file."""
    return sorted(n.name for n in p.iterdir() if n.name != locks.LOCK_NAME) if p.is_dir() else []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")


def check_destination(dst: str, fmt: str, *, overwrite: bool = False) -> None:
    """Raise `DestinationError` if an export of format `fmt` may not be written to `dst`
    (reasons in the module docstring). Reads only metadata: call it before loading anything."""
    p = _path(dst)
    run = enclosing_workdir(dst)
    if run is not None:
        where = "is the training workdir" if run == p else f"is inside the training workdir {run}"
        suggest = run.parent / (run.name + "_export" + (".safetensors" if fmt == "ldm" else ""))
        raise DestinationError(
            f"--dst {dst} {where} (it holds checkpoints/ or metrics.jsonl): an export there would "
            f"change what --model={run} loads (the run's newest step). Write the export outside the "
            f"run, e.g. --dst {suggest}")
    if fmt == "ldm":
        if not p.name.endswith(LDM_SUFFIXES):
            raise DestinationError(f"--dst {dst}: an LDM checkpoint is one file; name it *.safetensors "
                                   "(or *.ckpt for a PyTorch pickle)")
        if p.is_dir():
            raise DestinationError(f"--dst {dst} is a folder; an LDM checkpoint is one file: give a "
                                   f"file name, e.g. --dst {p / 'model.safetensors'}")
        if p.exists() and not overwrite:
            raise DestinationError(f"--dst {dst} already exists; pass --overwrite to replace it, or "
                                   "choose another file name")
        return
    if p.exists() and not p.is_dir():
        raise DestinationError(f"--dst {dst} is a file; a {fmt} export is a folder: give a new or "
                               "empty folder")
    held = _contents(p)
    if not held:
        return
    if not overwrite:
        raise DestinationError(
            f"--dst {dst} already holds files ({_listing(held)}); pass --overwrite to replace that "
            "export as a whole, or choose a new or empty folder")
    if not any((p / m).exists() for m in EXPORT_MARKERS):
        raise DestinationError(
            f"--dst {dst} holds files that are not a Paint-by-Example export ({_listing(held)}; no "
            f"{' or '.join(EXPORT_MARKERS)}); --overwrite replaces only a previous export. Choose "
            "a new or empty folder, or remove that one yourself")


def _remove(p: epath.Path) -> None:
    try:
        if "://" not in os.fspath(p) and os.path.islink(p):  # a link aside: drop the link only
            os.unlink(p)
        elif p.is_dir():
            shutil.rmtree(p) if "://" not in os.fspath(p) else p.rmtree()
        elif p.exists():
            p.unlink()
    except OSError as e:
        log.warning("could not remove %s (%s); delete it by hand", p, e)


class Destination:
    """`--dst` of one export: checked and locked on entry, written whole by `write`."""

    def __init__(self, dst: str, fmt: str, *, overwrite: bool = False, lock: bool = True,
                 reclaim: bool = False):
        self.dst, self.fmt, self.overwrite = dst, fmt, overwrite
        self.path = _path(dst)
        self.local = "://" not in dst
        # An LDM file's lock is its folder's; a folder export's is the folder's own.
        self.lock_dir = self.path.parent if fmt == "ldm" else self.path
        self._lock_enabled, self._reclaim = lock, reclaim
        self._lock: locks.FolderLock | None = None
        self._created = False
        self._open = False

    # ------------------------------------------------------------------ open / close

    def open(self) -> "Destination":
        """Check `dst` and take its lock (raises `DestinationError` / `locks.LockedError`)."""
        if self._open:
            return self
        check_destination(self.dst, self.fmt, overwrite=self.overwrite)
        self._created = not self.lock_dir.exists()
        if self._lock_enabled:
            self._lock = locks.FolderLock(self.lock_dir, "--dst", reclaim=self._reclaim)
            try:
                self._lock.acquire()
            except BaseException:
                self._drop_created()
                raise
        self._open = True
        try:
            # again under the lock: another export may have written it since the first check
            check_destination(self.dst, self.fmt, overwrite=self.overwrite)
            self._sweep()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Give the lock back (and remove the folder it created if nothing else is in it)."""
        self._open = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._drop_created()

    def __enter__(self) -> "Destination":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop_created(self) -> None:
        """Remove the folder the lock created if nothing was put in it (a refused or failed
        export into a new folder leaves no empty folder behind)."""
        if self._created and self.local and self.lock_dir.is_dir() and not any(self.lock_dir.iterdir()):
            try:
                self.lock_dir.rmdir()
            except OSError:
                pass

    # ------------------------------------------------------------------ temporary siblings

    def _sibling(self, tag: str) -> epath.Path:
        suffix = self.path.suffix if self.fmt == "ldm" else ""  # save_ldm picks the format by it
        return self.path.parent / f".{self.path.name}{tag}{uuid.uuid4().hex[:8]}{suffix}"

    def _sweep(self) -> None:
        """Delete what an export killed mid-way left next to `dst` (we hold its lock, so no live
        export is writing them). A previous export left aside by a kill between the two renames
        is kept while `dst` holds no export, and named, so it can be put back."""
        if not self.local:
            return
        for q in sorted(self.path.parent.glob(f".{self.path.name}{TMP_TAG}*")):
            log.warning("removing %s, left by an interrupted export", q)
            _remove(q)
        intact = self.path.is_file() or any((self.path / m).exists() for m in EXPORT_MARKERS)
        for q in sorted(self.path.parent.glob(f".{self.path.name}{OLD_TAG}*")):
            if intact:
                log.warning("removing %s, the previous export an interrupted export left aside", q)
                _remove(q)
            else:
                log.warning("%s is the previous export of %s, left aside by an export killed while "
                            "renaming; rename it to %s to get it back", q, self.dst, self.dst)

    # ------------------------------------------------------------------ writing

    def write(self, model, *, card: Any = None, repo_id: str | None = None, **save_kwargs) -> str:
        """`model.save_pretrained(<temporary sibling>, format=fmt, ...)`, then the swap into
        `dst`. Returns the written path (absolute for orbax, as `save_orbax` does)."""
        final = os.fspath(self.path) if self.fmt == "orbax" else self.dst
        if not self.local:
            if self.overwrite and self.path.is_dir():  # no atomic folder rename on object stores
                for q in self.path.iterdir():
                    if q.name != locks.LOCK_NAME:
                        _remove(q)
            return model.save_pretrained(self.dst, format=self.fmt, card=card, repo_id=repo_id,
                                         **save_kwargs)
        tmp = self._sibling(TMP_TAG)
        try:
            model.save_pretrained(os.fspath(tmp), format=self.fmt, card=card, repo_id=repo_id,
                                  **save_kwargs)
            if self.fmt != "ldm" and (tmp / CARD_FILE).exists():  # the card names where it lives
                atomic_write(tmp / CARD_FILE, str(make_model_card(
                    model, as_card_info(card), repo_id=repo_id, fmt=self.fmt, path=final)))
            self._swap(tmp)
        except BaseException:
            for q in self.path.parent.glob(tmp.name + "*"):  # with a writer's own `.tmp` file
                _remove(q)
            raise
        return final

    def _swap(self, tmp: epath.Path) -> None:
        """Put the finished export `tmp` at `dst`: one rename for a file; for a folder, the old
        one (or the empty folder holding our lock) renamed aside, the new one in, the old one
        deleted."""
        if self.fmt == "ldm":
            os.replace(tmp, self.path)
            return
        aside = None
        if self.path.exists():
            aside = self._sibling(OLD_TAG)
            os.rename(self.path, aside)
        try:
            os.rename(tmp, self.path)
        except BaseException:
            if aside is not None and not self.path.exists():
                os.rename(aside, self.path)
            raise
        if aside is not None:
            _remove(aside)
