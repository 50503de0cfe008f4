r"""Paint-by-Example training: `python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=DIR`.

The run itself is `pbe_jax.training.loop.train_and_evaluate(config, workdir)`; the step, the
setup (abstract model, shardings) and the optimizer live in `pbe_jax.training`.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from pbe_jax import distributed, locks, runtime
from pbe_jax.configs.validate import check_or_exit
from pbe_jax.metrics import setup_logging
from pbe_jax.training import preflight
from pbe_jax.training.loop import train_and_evaluate
from pbe_jax.training.preemption import Preempted
from pbe_jax.training.watchdog import heartbeat_seconds


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pbe.py:demo",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs); gs:// works")
    flags.DEFINE_bool("reclaim_lock", False, "take over the workdir's lock when its holder (named "
                      "in the refusal) is on another host that is known to be gone")
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()


def main(argv) -> None:
    del argv
    clock = runtime.StartupClock()  # 'imports': interpreter start to here
    check_or_exit(flags.FLAGS.config)  # every field, with the command line's overrides
    distributed.initialize_from_flags(heartbeat_seconds=heartbeat_seconds(flags.FLAGS.config))
    setup_logging()
    try:  # the checks that need the data: now, not after the VAE stage
        preflight.check_data(flags.FLAGS.config, flags.FLAGS.workdir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    clock.mark("runtime+distributed")
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, clock,
                           reclaim_lock=flags.FLAGS.reclaim_lock)
    except Preempted as e:  # SIGTERM in a stage without checkpoints: stopped cleanly
        logging.getLogger("pbe_jax").warning("%s", e)
    except locks.LockedError as e:  # another run writes this workdir: say who, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
