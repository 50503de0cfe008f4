# A regular package, so that `tests.*` imports resolve to this folder even when a wheel in the
# environment ships a top-level `tests` package of its own (torch-fidelity does).
