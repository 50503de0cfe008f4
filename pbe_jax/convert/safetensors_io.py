"""Read and write `.safetensors` (and `.bin` via restricted unpickling) without torch in the core.

The reader parses the format itself (8-byte little-endian header size, JSON header, raw bytes)
over a memory map, so that: bf16 tensors load (through ml_dtypes), nothing is copied until a
tensor is used, and a truncated or corrupt file fails with a message naming the file and the
tensor instead of a generic error.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointFormatError(ValueError):
    """A checkpoint file is unreadable: truncated, corrupt header, unknown dtype."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only)."""
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointFormatError(f"{path}: {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointFormatError(
                f"{path}: header claims {n} bytes but the file has {size - 8} after the size "
                "field (truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else None
    avail = size - 8 - n
    out = {}
    for key, info in header.items():
        dt = info.get("dtype")
        if dt not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {dt!r}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > avail:
            raise CheckpointFormatError(
                f"{path}: tensor {key!r} {shape} needs bytes [{start}, {end}) but the file "
                f"holds only {avail} data bytes (truncated file)"
            )
        dtype = np.dtype(_DTYPES[dt])
        if (end - start) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: tensor {key!r} byte range does not match {shape} {dt}")
        arr = data[start:end].view(dtype).reshape(shape) if end > start else np.zeros(shape, dtype)
        out[key] = arr
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None):
    """Write tensors (numpy, any `_DTYPES` dtype) as a safetensors file, keys sorted."""
    header, offset, arrays = {}, 0, []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise CheckpointFormatError(f"cannot write tensor {key!r}: dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # align data to 8 bytes like the reference writer
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A PyTorch pickle (`.bin`, `.ckpt`, `.pt`) with `torch.load(weights_only=True)`: no
    arbitrary unpickling. Needs torch installed (only for this legacy format)."""
    try:
        import torch  # noqa: PLC0415 (torch only for reading its own pickle format)
    except ImportError as e:
        raise CheckpointFormatError(
            f"{path}: reading PyTorch pickle files needs torch; convert to safetensors or "
            "`pip install torch`"
        ) from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointFormatError(f"{path}: cannot load with weights_only=True ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # Lightning / LDM checkpoints
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            if v.dtype == torch.bfloat16:
                out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
            else:
                out[k] = v.numpy()
    return out


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_bin(path)


def read_checkpoint_files(paths: Iterable[str]) -> dict[str, np.ndarray]:
    """Merge several shard files, failing on a key present in two shards."""
    out: dict[str, np.ndarray] = {}
    for p in paths:
        for k, v in read_checkpoint(p).items():
            if k in out:
                raise CheckpointFormatError(f"{p}: key {k!r} also present in an earlier shard")
            out[k] = v
    return out
