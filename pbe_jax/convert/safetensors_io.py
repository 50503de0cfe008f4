"""Read and write `.safetensors` (through the `safetensors` package) and `.bin` (restricted
unpickling) without torch in the core.

Reading is lazy, one tensor at a time: `open_safetensors` validates the header (the package does,
in Rust) and returns `LazyTensor`s that read their bytes only when converted to an array, so a
loader that converts, places and drops each tensor in turn never holds a multi-GB checkpoint in
host memory twice (once as numpy copies, once on device). bf16 tensors load through ml_dtypes.

The package's errors say what is wrong but not where: every failure is re-raised as one
`CheckpointFormatError` naming the file, and for a malformed header (truncated file, a list or a
string where an object belongs, negative shapes or offsets, deep nesting, unknown dtypes) our own
header check names the tensor too.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointFormatError(ValueError):
    """A checkpoint file is unreadable: truncated, corrupt header, unknown dtype."""


class LazyTensor:
    """One tensor of a safetensors file, read when it becomes an array (`np.asarray(t)`,
    `t[...]`). `shape` and `dtype` come from the header and cost nothing."""

    __slots__ = ("_file", "key", "shape", "dtype")

    def __init__(self, file: _OpenFile, key: str, shape: tuple[int, ...], dtype: np.dtype):
        self._file, self.key, self.shape, self.dtype = file, key, shape, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor's values: a fresh host array."""
        return self._file.read(self.key, self.shape, self.dtype)

    def __array__(self, dtype=None, copy=None):
        arr = self.read()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __getitem__(self, index):
        return self.read()[index]

    def astype(self, dtype) -> np.ndarray:
        return self.read().astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor({self._file.path}:{self.key}, shape={self.shape}, dtype={self.dtype})"


class _OpenFile:
    """A `safe_open` handle shared by the LazyTensors of one file (closed with the last one)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.handle = safe_open(path, framework="np")
        except SafetensorError as e:
            raise CheckpointFormatError(header_problem(path) or f"{path}: not a valid safetensors "
                                        f"file ({e})") from None

    def read(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        try:
            arr = self.handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{self.path}: cannot read tensor {key!r} {shape} "
                                        f"{dtype} ({e})") from None
        return arr


def open_safetensors(path: str) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file, lazily read (see `LazyTensor`). The header is fully
    validated here: a malformed or truncated file fails now, naming the file (and the tensor)."""
    f = _OpenFile(path)
    out = {}
    for key in f.handle.keys():
        info = f.handle.get_slice(key)
        name = info.get_dtype()
        if name not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {name!r}")
        out[key] = LazyTensor(f, key, tuple(int(d) for d in info.get_shape()), np.dtype(_DTYPES[name]))
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (read now; for large files prefer
    `open_safetensors`)."""
    return {k: t.read() for k, t in open_safetensors(path).items()}


def read_metadata(path: str) -> dict[str, str]:
    """The file's `__metadata__` (string -> string), {} when absent."""
    return dict(_OpenFile(path).handle.metadata() or {})


def header_problem(path: str) -> str | None:
    """What is wrong with a safetensors header, naming the file and, where one is to blame, the
    tensor; None when the header looks well formed (then the package's message stands)."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{path}: {size} bytes, too short for a safetensors header"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return (f"{path}: header claims {n} bytes but the file has {size - 8} after the size "
                    "field (truncated or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
    avail = size - 8 - n
    for key, info in header.items():
        problem = _entry_problem(info, avail)
        if problem:
            return f"{path}: tensor {key!r}: {problem}"
    return None


def _entry_problem(info, avail: int) -> str | None:
    if not isinstance(info, dict):
        return f"header entry is a JSON {type(info).__name__}, not an object"
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dt not in _DTYPES:
        return f"unsupported dtype {dt!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not [start, end] with 0 <= start <= end"
    start, end = offsets
    if end > avail:
        return (f"{tuple(shape)} needs bytes [{start}, {end}) but the file holds only {avail} data "
                "bytes (truncated file)")
    if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dt]).itemsize:
        return f"byte range [{start}, {end}) does not match {tuple(shape)} {dt}"
    return None


def honour_umask(path: str) -> None:
    """Give a file written by a library the mode a plain `open(path, "w")` would (0644 under
    umask 022): safetensors creates its files 0600, which other users and services cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None):
    """Write tensors (numpy or LazyTensor, any `_DTYPES` dtype) as a safetensors file, through a
    temp file renamed into place (a crash never leaves a half-written file under `path`)."""
    arrays = {}
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise CheckpointFormatError(f"cannot write tensor {key!r} to {path}: dtype {arr.dtype}")
        arrays[key] = arr
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    tmp = path + ".tmp"
    try:
        save_file(arrays, tmp, metadata=meta)
        honour_umask(tmp)
        os.replace(tmp, path)
    except (SafetensorError, ValueError) as e:
        _unlink(tmp)
        raise CheckpointFormatError(f"{path}: cannot write safetensors ({e})") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    """Remove a cut temporary file (a failed write leaves nothing behind)."""
    try:
        os.remove(path)
    except OSError:
        pass


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


def write_torch_ckpt(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """A Lightning-style `{'state_dict': {...}}` PyTorch pickle (the original LDM `.ckpt`
    layout). Needs torch; written only when a `.ckpt` is asked for by name."""
    try:
        import torch  # noqa: PLC0415 (torch only for writing its own pickle format)
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: writing a PyTorch .ckpt needs torch; write "
                                    ".safetensors instead or `pip install torch`") from e
    sd = {}
    for k in sorted(tensors):
        arr = np.ascontiguousarray(tensors[k])
        sd[k] = (torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
                 if arr.dtype == ml_dtypes.bfloat16 else torch.from_numpy(arr))
    tmp = path + ".tmp"
    try:
        torch.save({"state_dict": sd}, tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def read_checkpoint(path: str) -> dict[str, np.ndarray | LazyTensor]:
    """A weights file's tensors: safetensors lazily (`LazyTensor`), pickles eagerly."""
    if path.endswith(".safetensors"):
        return open_safetensors(path)
    return read_torch_bin(path)


def read_checkpoint_files(paths: Iterable[str]) -> dict[str, np.ndarray | LazyTensor]:
    """Merge several shard files (lazily, see `read_checkpoint`), failing on a key present in
    two shards."""
    out: dict[str, np.ndarray | LazyTensor] = {}
    for p in paths:
        for k, v in read_checkpoint(p).items():
            if k in out:
                raise CheckpointFormatError(f"{p}: key {k!r} also present in an earlier shard")
            out[k] = v
    return out
