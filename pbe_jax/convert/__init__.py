"""Checkpoint conversion: PyTorch (diffusers / transformers / LDM) state dicts <-> NNX state."""
