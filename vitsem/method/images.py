"""Safe image loading: every failure is a typed :class:`~vitsem.errors.ImageError` naming the file.

Valid but unusual images are normalised the way timm's own loaders do, so the model sees
what it was trained on: EXIF orientation is applied, grayscale/palette/CMYK become RGB,
alpha is dropped (``convert("RGB")``), 16-bit samples are scaled to 8 bits.
"""

from __future__ import annotations

import io
import warnings
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
    try:
        upright: Image.Image = ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, KeyError) as e:
        raise TruncatedImageError(label, f"corrupt EXIF orientation data ({e})") from e
    return _to_8bit_rgb(upright, label)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so batch order is deterministic."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
