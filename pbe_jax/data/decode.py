"""Image bytes -> RGB uint8 `[H, W, 3]`, robust to what real folders hold.

Each image is probed first (PIL reads only the header: size, mode, EXIF orientation), so the
crop geometry can be drawn before any pixel is decoded and the decoder can work at 1/2, 1/4 or
1/8 size when that is enough. Pixels are decoded with OpenCV (about 2x faster than PIL on full
JPEGs; it also converts grayscale, RGBA, palette, CMYK and 16-bit images to 8-bit RGB
correctly), or with PIL's JPEG draft mode when decoding at reduced size (faster than OpenCV's
`IMREAD_REDUCED_*`, measured).

EXIF orientation is applied to the pixels, as `cv2.imread` in the official code does. Boxes of a
record are taken to be in the displayed (oriented) frame, except when the record carries the
image size it was annotated at and that size is the raw, un-rotated one while the orientation
swaps width and height: then the annotation was drawn on the raw pixels and the boxes are moved
with the pixels (`orient_boxes`).
"""
from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Why a record was changed or skipped; the order fixes the `bad_counts` vector carried by every
# sample (pipeline.py) and is part of the saved loader state, so only append to it.
BAD_REASONS = (
    # skipped (the sample is replaced by another record)
    "missing_file",
    "undecodable",
    "truncated",
    "image_too_small",
    "no_valid_box",
    # fixed (the sample is used)
    "grayscale",
    "alpha_dropped",
    "cmyk",
    "palette",
    "high_bit_depth",
    "exif_rotated",
    "exif_boxes_rotated",
    "box_clipped",
    "box_degenerate",
    "upsampled",
    # skipped: a `folder` source's object mask (NAME_mask.png) cannot be used
    "mask_undecodable",
    "mask_empty",
    "mask_size_mismatch",
    # skipped: over config.data.max_image_pixels (a decompression bomb, or just too big to decode)
    "too_large",
)
REASON_INDEX = {r: i for i, r in enumerate(BAD_REASONS)}

_EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that transpose the image


class BadImage(Exception):
    """The image cannot be used; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Header:
    """What the file header says. `raw_size` is (W, H) as stored; `size` is (W, H) as displayed
    (after the EXIF orientation)."""

    raw_size: tuple[int, int]
    orientation: int
    mode: str
    format: str
    high_bit_depth: bool

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.raw_size
        return (h, w) if self.orientation in SWAPS_SIDES else (w, h)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or corrupt) of an opened image, from its header.

    PIL's `PngImageFile.getexif()` decodes the whole image first (in case an eXIf chunk follows
    the pixel data): for an 81-megapixel PNG that is 240 MB and seconds, before any size limit
    is checked. PNG requires eXIf before the pixel data, so the base method (the chunks PIL read
    at open) sees every conforming file's orientation without decoding a pixel."""
    try:
        exif = Image.Image.getexif(im) if im.format == "PNG" else im.getexif()
        orientation = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a corrupt EXIF block does not make the pixels unusable
        return 1
    return orientation if orientation in range(1, 9) else 1


def probe(data: bytes) -> Header:
    """Parse the header of encoded image `data` without decoding pixels (~20 us)."""
    try:
        im = Image.open(io.BytesIO(data))
        orientation = exif_orientation(im)
        fmt = im.format or ""
        # PIL opens 16-bit RGB PNGs as mode 'RGB'; the IHDR bit depth (byte 24) tells.
        high = im.mode.startswith("I") or (fmt == "PNG" and len(data) > 24 and data[24] == 16)
        return Header(raw_size=im.size, orientation=orientation, mode=im.mode, format=fmt,
                      high_bit_depth=high)
    except Image.DecompressionBombError as e:  # PIL's own limit; not an OSError
        raise BadImage("too_large", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage("undecodable", str(e)) from e


def fix_reasons(header: Header) -> list[str]:
    """The BAD_REASONS of kind 'fixed' that decoding this image will apply."""
    mode = header.mode
    out = []
    if mode in ("L", "LA", "1", "I", "F") or mode.startswith("I;"):
        out.append("grayscale")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        out.append("alpha_dropped")
    if mode == "CMYK":
        out.append("cmyk")
    if mode in ("P", "PA"):
        out.append("palette")
    if header.high_bit_depth:
        out.append("high_bit_depth")
    if header.orientation != 1:
        out.append("exif_rotated")
    return out


def decode(data: bytes, header: Header, reduce: int = 1) -> np.ndarray:
    """Decode to RGB uint8 `[H, W, 3]` in the displayed orientation.

    `reduce` in (1, 2, 4, 8) decodes a JPEG at about 1/reduce size (libjpeg DCT scaling); other
    formats ignore it. Raises BadImage('truncated' | 'undecodable').
    """
    if reduce > 1 and header.format == "JPEG" and header.mode in ("RGB", "L", "CMYK"):
        img = _decode_pil_draft(data, header, reduce)
    else:
        img = cv2.imdecode(np.frombuffer(data, np.uint8),
                           cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:
            raise BadImage(_why_undecodable(data), f"{header.format} {header.raw_size}")
        if img.dtype != np.uint8:  # cv2 scales 16-bit to 8-bit for IMREAD_COLOR; be sure
            img = (img // 257).astype(np.uint8)
    return orient(img, header.orientation)


def _decode_pil_draft(data: bytes, header: Header, reduce: int) -> np.ndarray:
    w, h = header.raw_size
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
        img = np.asarray(im.convert("RGB"))
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "undecodable"
        raise BadImage(reason, str(e)) from e
    return img


def _why_undecodable(data: bytes) -> str:
    # cv2 answers None for both; PIL says which.
    try:
        Image.open(io.BytesIO(data)).load()
    except OSError as e:
        if "truncated" in str(e):
            return "truncated"
    except Exception:
        pass
    return "undecodable"


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF `orientation` (1..8) to `[H, W, C]` pixels (as PIL's `exif_transpose`)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.transpose(1, 0, 2)
    elif orientation == 6:  # 90 degrees clockwise
        img = img.transpose(1, 0, 2)[:, ::-1]
    elif orientation == 7:
        img = img[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:  # 90 degrees counter-clockwise
        img = img.transpose(1, 0, 2)[::-1]
    return np.ascontiguousarray(img)


def orient_boxes(boxes: np.ndarray, orientation: int) -> np.ndarray:
    """Move normalised `[N, 4]` (x0, y0, x1, y1) boxes of the raw frame with `orient`."""
    u0, v0, u1, v1 = boxes.T
    if orientation == 2:
        out = (1 - u1, v0, 1 - u0, v1)
    elif orientation == 3:
        out = (1 - u1, 1 - v1, 1 - u0, 1 - v0)
    elif orientation == 4:
        out = (u0, 1 - v1, u1, 1 - v0)
    elif orientation == 5:  # (u, v) -> (v, u)
        out = (v0, u0, v1, u1)
    elif orientation == 6:  # (u, v) -> (1 - v, u)
        out = (1 - v1, u0, 1 - v0, u1)
    elif orientation == 7:  # (u, v) -> (1 - v, 1 - u)
        out = (1 - v1, 1 - u1, 1 - v0, 1 - u0)
    elif orientation == 8:  # (u, v) -> (v, 1 - u)
        out = (v0, 1 - u1, v1, 1 - u0)
    else:
        return boxes
    return np.stack(out, axis=-1).astype(boxes.dtype)


def boxes_in_raw_frame(header: Header, annotated_size: tuple[int, int] | None) -> bool:
    """Whether a record's boxes were drawn on the raw pixels: only decidable when the record
    carries its annotated (W, H) and the orientation swaps the sides."""
    if not annotated_size or header.orientation not in SWAPS_SIDES:
        return False
    aw, ah = annotated_size
    rw, rh = header.raw_size
    return (aw, ah) == (rw, rh) and (aw, ah) != header.size


def decode_mask(data: bytes, header: Header, key: str = "") -> np.ndarray:
    """An object mask file (white = object) -> `[H, W]` bool in the displayed frame of the image
    whose `header` is given.

    Any bit depth or channel count: 16-bit and float masks are scaled to [0, 1] before the 0.5
    threshold (not clipped), colour masks go through their luma, an alpha channel is ignored.
    The mask is taken as the image is displayed; a mask of the stored (un-rotated) size of an
    EXIF-rotated image is rotated with its pixels. Raises BadImage('mask_undecodable' |
    'mask_size_mismatch')."""
    m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if m is None or m.ndim not in (2, 3) or m.size == 0:
        raise BadImage("mask_undecodable", key)
    if m.ndim == 3:  # BGR(A) as cv2 decodes it
        m = cv2.cvtColor(np.ascontiguousarray(m[..., :3]), cv2.COLOR_BGR2GRAY) if m.shape[2] >= 3 else m[..., 0]
    if np.issubdtype(m.dtype, np.integer):
        full = np.iinfo(m.dtype).max
    else:  # float masks are in [0, 1]
        full = 1.0
    mask = m.astype(np.float32) > 0.5 * full
    h, w = mask.shape
    if (w, h) == header.size:
        return mask
    if (w, h) == header.raw_size and header.orientation != 1:
        return orient(mask[..., None], header.orientation)[..., 0]
    raise BadImage("mask_size_mismatch", f"{key}: mask {w}x{h}, image {header.size[0]}x{header.size[1]}")
