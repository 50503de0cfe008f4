"""Orbax checkpoints of a training run: train state, frozen params, data-iterator state, config.

Layout: `WORKDIR/checkpoints/<step>/{state,frozen,data,config}`. Saves are async (training goes
on while files are written); orbax writes to a temporary name and renames when complete, so a
process killed mid-save leaves no half checkpoint under a step name. A checkpoint that exists
but fails to restore (corrupt files) makes `restore_latest` fall back to the previous one with
a warning; it never falls back to a silent fresh start.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            frozen=ocp.args.StandardSave(frozen),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int, state_target: Any, frozen_target: Any | None):
        items = {"state": ocp.args.StandardRestore(state_target), "data": ocp.args.JsonRestore(),
                 "config": ocp.args.JsonRestore()}
        if frozen_target is not None:
            items["frozen"] = ocp.args.StandardRestore(frozen_target)
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
