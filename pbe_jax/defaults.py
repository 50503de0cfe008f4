"""The generation defaults, in one place: the library (`inference.edit`, `PaintByExample.__call__`),
the command lines (`pbe_jax.cli_flags`) and the web demo all take theirs from here."""

NUM_INFERENCE_STEPS = 50  # denoising steps (the paper's benchmark)
GUIDANCE_SCALE = 5.0  # classifier-free guidance scale (the paper's benchmark; 1 = off)
