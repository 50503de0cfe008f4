"""Evaluation that runs the model (above `pbe_jax.inference` and `pbe_jax.batch_edit`; the
metrics themselves are `pbe_jax.evals`):

- `benchmark`: COCOEE as a library: sample the bench, score a results folder, the in-training
  hook (`config.evals`); `python -m pbe_jax.evaluate` is its command line.
- `cocoee`: the COCOEE bench on disk: triplets, result files of any tool, the FID reference set.
- `exemplar`: the held-out exemplar-following eval on the demo's synthetic scenes.
"""
