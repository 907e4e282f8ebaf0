"""Safe image loading: every failure is a typed :class:`~vitsem.errors.ImageError` naming the file.

Valid but unusual images are normalised the way timm's own loaders do, so the model sees
what it was trained on: EXIF orientation is applied, grayscale/palette/CMYK become RGB,
alpha is dropped (``convert("RGB")``), 16-bit samples are scaled to 8 bits.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitsem.errors import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageModeError,
)

DEFAULT_MAX_PIXELS = 64_000_000
"""Decompression-bomb limit (width * height) checked from the header, before decoding."""

DEFAULT_MIN_SIDE = 8
"""Smallest accepted side in pixels: below this SIFT and a patch grid carry no information."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an input image must respect; pixels and sides in pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def _to_8bit_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit data stored as "I" too; scale by the format's range, not the image's own max,
        # so that brightness is preserved.
        top = 65535 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255
        arr8 = np.clip(arr * 255 // top, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        raise UnsupportedImageModeError(
            name, "32-bit float images are not supported; save it as 8- or 16-bit PNG/TIFF"
        )
    if mode != "RGB":
        return img.convert("RGB")
    return img


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # (x0, y0, dx, dy) of each interlace pass


def png_missing_rows(data: bytes) -> str | None:
    """Why a PNG's pixel data is shorter than its header says, or None when complete (or
    not a PNG). Pillow fills the rows a PNG lacks with zeros when its compressed stream ends
    cleanly, so a header claiming 8000x8000 with 10 rows of data decodes as a valid image;
    this inflates the ``IDAT`` data again (counting bytes, keeping none) and compares."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return None
    w, h, depth, colour, _c, _f, interlace = header
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw and ph:
            expected += ph * (1 + (pw * bits + 7) // 8)
    inflate, got, buf = zlib.decompressobj(), 0, b"".join(idat)
    try:
        chunk = inflate.decompress(buf, 1 << 20)
        while chunk:
            got += len(chunk)
            if got >= expected:
                return None
            chunk = inflate.decompress(inflate.unconsumed_tail, 1 << 20)
    except zlib.error as e:
        return f"its pixel data is corrupt ({e})"
    return (f"its pixel data ends after {got:,} of {expected:,} bytes ({w}x{h} in the "
            "header); the rows after that are missing")


def open_image(source: str | Path | bytes, *, name: str | None = None,
               limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) to an 8-bit RGB PIL image.

    Raises a subclass of :class:`ImageError` naming ``name`` (or the path) on any problem.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as e:
            raise ImageError(label, "file not found; check the path") from e
        except OSError as e:
            raise ImageError(label, f"cannot read file ({e.strerror}); check permissions") from e
    if len(data) == 0:
        raise EmptyImageError(label, "file is empty (0 bytes); re-export or remove it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise NotAnImageError(label, "not a recognised image format") from e
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(label, str(e)) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise TruncatedImageError(
                label, f"image header is truncated or corrupt ({e}); re-download or re-export it"
            ) from e
        w, h = img.size
        if w * h > limits.max_pixels:
            raise ImageTooLargeError(
                label,
                f"{w}x{h} = {w * h:,} pixels exceeds the limit of {limits.max_pixels:,} "
                "(decompression-bomb guard); downscale it or raise max_pixels",
            )
        if min(w, h) < limits.min_side:
            raise ImageTooSmallError(
                label, f"{w}x{h} is smaller than {limits.min_side} px on a side; nothing to analyse"
            )
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(label, str(e)) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise TruncatedImageError(
                label, f"image data is truncated or corrupt ({e}); re-download or re-export it"
            ) from e
        missing = png_missing_rows(data) if img.format == "PNG" else None
        if missing is not None:
            raise TruncatedImageError(label, f"{missing}; re-download or re-export it")
    try:
        upright: Image.Image = ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, KeyError) as e:
        raise TruncatedImageError(label, f"corrupt EXIF orientation data ({e})") from e
    return _to_8bit_rgb(upright, label)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so batch order is deterministic."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
