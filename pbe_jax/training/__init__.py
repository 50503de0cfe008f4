"""Training: `loop.train_and_evaluate(config, workdir)` (the run), `state.Setup` (everything
derived from config and mesh before any array exists), `step.make_train_step` (the pure step),
`optim` (AdamW + warm-up), `samples` (in-training sample grids)."""
