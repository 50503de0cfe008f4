"""Benchmarks of pbe_jax against the PyTorch stack it replaces; run via `python -m pbe_jax.bench`."""
