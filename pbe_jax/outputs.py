"""Files a rerun trusts: written whole or not at all, in a folder checked writable up front.

Every file pbe_jax writes that a later run reads back or counts as done (sample PNGs and their
`settings.json`, `metrics.jsonl` rewrites, training images and `config.json`, evaluation
reports, feature caches, exported configs) goes through `atomic_write`: the bytes go to a
temporary name in the same folder, which is renamed over the final name once complete. A kill or
a full disk leaves the old file or none, never a cut one. (Renaming within one folder is atomic
on local file systems; on object stores it is a copy, still only of complete bytes.)
`decodes` is the resume check for images written before that, or damaged since.
`ensure_writable` makes a command fail at start, naming the flag, instead of after its first
hour of compute.

Paths may be local or anything `etils.epath` opens (e.g. `gs://`).
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath
from PIL import Image


class NotWritableError(OSError):
    """An output folder cannot be created or written."""


def _temp_name(path: epath.Path) -> epath.Path:
    # Hidden, and no image / JSON extension, so no folder listing takes it for a result.
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = epath.Path(path)
    tmp = _temp_name(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass
        raise


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """`json.dumps(obj, indent=2, **dump_kwargs)` written with `atomic_write`."""
    atomic_write(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}))


def write_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    """An image (PIL, or uint8 `[H, W]` / `[H, W, 3]`) as a PNG, with `atomic_write`."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def decodes(path: str | os.PathLike) -> bool:
    """Whether `path` is an image whose pixels decode completely (False for a missing, empty
    or cut-short file)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, bomb errors)
        return False
    return True


def ensure_writable(directory: str | os.PathLike, what: str) -> None:
    """Create `directory` if needed and write and remove a probe file in it; raise
    `NotWritableError` naming `what` (e.g. '--out') otherwise."""
    d = epath.Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = _temp_name(d / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NotWritableError(f"{what} {directory}: cannot write there ({type(e).__name__}: {e}); "
                               "give a folder this process can create and write") from None
