"""What a training run checks around its loop, so that `loop.train_and_evaluate` reads as the
run itself: one writer per workdir, a resume past `num_steps`, a resumed run whose config
changed, and a run whose every step was skipped as non-finite.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Callable

import jax
import ml_collections
from etils import epath

from pbe_jax import checkpoint, locks
from pbe_jax.configs.validate import validate
from pbe_jax.metrics import check_workdir_backend
from pbe_jax.outputs import atomic_write, ensure_writable

log = logging.getLogger("pbe_jax")

CONFIG_FILE = "config.json"  # WORKDIR/config.json: the config of the run's newest start


def holds_workdir_lock(run: Callable) -> Callable:
    """`run(config, workdir, ...)` holding WORKDIR's lock (`pbe_jax.locks`, taken on process 0
    only) from before anything is written to its end: a second run on the same workdir raises
    `locks.LockedError` naming the holder (pid, host, command) instead of mixing checkpoints and
    metrics. The wrapped function takes `reclaim_lock=True` (the command line's
    `--reclaim_lock`) to take over a lock whose holder on another host is known to be gone."""

    @functools.wraps(run)
    def locked(config, workdir: str, *args, reclaim_lock: bool = False, **kwargs):
        validate(config)  # every field (pbe_jax/configs/validate.py), before the workdir is made
        check_workdir_backend(workdir)  # a gs:// workdir without its packages fails here
        ensure_writable(workdir, "--workdir")  # a clear message before the lock file is made
        with locks.hold(workdir, "--workdir", enabled=jax.process_index() == 0,
                        reclaim=reclaim_lock):
            return run(config, workdir, *args, **kwargs)

    return locked


def check_steps_left(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before anything is built: a workdir whose newest checkpoint is past
    `config.train.num_steps` is refused (training would do nothing, silently); one exactly at it
    is a finished run, said so (rerunning its command is harmless and exits 0)."""
    steps = checkpoint.finished_steps(checkpoint.ckpt_dir(workdir))
    if not steps:
        return
    newest, num = steps[-1], int(config.train.num_steps)
    if newest > num:
        raise ValueError(
            f"config.train.num_steps={num} is below the step of the run's newest checkpoint "
            f"({checkpoint.step_dir(checkpoint.ckpt_dir(workdir), newest)}, step {newest}): "
            f"nothing to train. To train on, set config.train.num_steps above {newest}; to train "
            "a shorter run, use a new --workdir.")
    if newest == num:
        log.warning("the run in %s is already done: its newest checkpoint is step %d = "
                    "config.train.num_steps; nothing to train (set config.train.num_steps above "
                    "%d to train on)", workdir, newest, num)


def config_changes_on_resume(saved: dict | None, config: ml_collections.ConfigDict,
                             step: int) -> list[tuple[str, object, object]]:
    """Log the fields of `config` that differ from the config saved with the checkpoint a run
    resumes from (`saved`, step `step`), old -> new; returns them."""
    if not saved:
        return []
    changes = checkpoint.config_changes(saved, json.loads(config.to_json()))
    if changes:
        log.warning("resumed at step %d with a config that differs from the checkpoint's in %d "
                    "field(s): %s", step, len(changes), checkpoint.describe_changes(changes, 50))
    return changes


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json := the run's current config (atomically; process 0)."""
    if jax.process_index() == 0:
        atomic_write(epath.Path(workdir) / CONFIG_FILE, config.to_json(indent=2))


def check_some_step_applied(config: ml_collections.ConfigDict, step0: int, step: int,
                            skips0: int, skips: int) -> None:
    """After the loop: a run that ran steps and skipped every one of them as non-finite
    (`nan_skips` went from `skips0` to `skips`) learned nothing; raise instead of a 'done'."""
    ran = step - step0
    if ran > 0 and skips - skips0 >= ran:
        raise FloatingPointError(
            f"every step of this run ({ran}: steps {step0 + 1}..{step}) was skipped because its "
            f"loss or gradient was not finite (config.train.nan_policy="
            f"{config.train.nan_policy!r}): the params did not change. Lower config.train.lr, "
            "check the data, or set config.train.nan_policy='stop' to stop at the first one.")
