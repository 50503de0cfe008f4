r"""Paint-by-Example training configs: the variants live in the installed package
(`pbe_jax/configs/pbe.py`, whose docstring has the commands); this file is what
`--config=configs/pbe.py:VARIANT[,ARGS]` points at.

  python -m pbe_jax.train --config=configs/pbe.py:demo --workdir=/tmp/pbe_demo
"""
from pbe_jax.configs.pbe import SWEEPS, VARIANTS, get_config, get_sweep, parse_arg  # noqa: F401
