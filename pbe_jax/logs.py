"""Library log lines that are not actionable, filtered at the default verbosity (shown again
with absl's `-v 1` / `--verbosity=1`, or `absl.logging.set_verbosity(1)`):

- orbax: `Metadata file does not exist: .../_CHECKPOINT_METADATA` (checkpoints written before
  orbax wrote that file load fine), `Type handler registry type ... overriding jax.Array`
  (pbe_jax's own handler registration);
- JAX: `Resetting cache at <empty>` (the compilation cache switching off or on).

`install()` runs when `pbe_jax` is imported; it only adds a filter to those loggers.
"""
from __future__ import annotations

import logging
import re

from absl import logging as absl_logging

NOISE = (
    re.compile(r"^Metadata file does not exist: .*_CHECKPOINT_METADATA"),
    re.compile(r"^Type handler registry type .* overriding "),
    re.compile(r"^Resetting cache at "),
)
# absl's python logger (orbax logs through absl) and JAX's compilation cache
LOGGERS = ("absl", "jax._src.compilation_cache")


def is_noise(message: str) -> bool:
    return any(p.search(message) for p in NOISE)


class NoiseFilter(logging.Filter):
    """Drops `NOISE` unless absl's verbosity is 1 or more (`-v 1`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if absl_logging.get_verbosity() >= 1:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a malformed record is not ours to judge)
            return True
        return not is_noise(message)


_FILTER = NoiseFilter()


def install() -> None:
    """Add the filter to the noisy loggers (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
