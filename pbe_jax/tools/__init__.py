"""Command-line tools that are not part of training itself (`python -m pbe_jax.tools.NAME`)."""
