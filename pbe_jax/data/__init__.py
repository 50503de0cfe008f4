"""Paint-by-Example training data: sources, the self-reference transforms, the grain loader.

- `config.data_config(variant)`: the `config.data` block.
- `batch`: the batch contract and `normalize_batch` (on device).
- `pipeline.make_loader` / `pipeline.make_dataset`: the grain pipeline.
- `python -m pbe_jax.data.preview`: a PNG grid of samples to check by eye.
"""

# The public submodules (what the API reference documents); `preview` and `bench` are command lines.
__all__ = ["batch", "config", "decode", "pipeline", "prefetch", "sources", "synthetic", "transforms"]
