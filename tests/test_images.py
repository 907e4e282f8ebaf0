"""Bad and unusual image files: typed errors naming the file, or correct normalisation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsem import errors
from vitsem.method.images import ImageLimits, open_image
from vitsem.method.keypoints import Rejected, ViewedKeypoints, sift_files
from vitsem.method.view import ModelView


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_zero_byte(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.png", b"")
    with pytest.raises(errors.EmptyImageError, match=r"empty\.png"):
        open_image(p)


def test_not_an_image(tmp_path: Path) -> None:
    p = _write(tmp_path / "notes.jpg", b"this is a text file, not a JPEG\n" * 10)
    with pytest.raises(errors.NotAnImageError, match=r"notes\.jpg"):
        open_image(p)


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(errors.ImageError, match="not found"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(errors.ImageError, match="cannot read"):
        open_image(tmp_path)  # a directory cannot be read as a file


def test_truncated(tmp_path: Path) -> None:
    data = _png(_rgb(200, 200))
    p = _write(tmp_path / "cut.png", data[: len(data) // 2])
    with pytest.raises(errors.TruncatedImageError, match=r"cut\.png"):
        open_image(p)
    buf = io.BytesIO()
    _rgb(200, 200).save(buf, format="JPEG")
    p = _write(tmp_path / "cut.jpg", buf.getvalue()[:600])
    with pytest.raises(errors.TruncatedImageError, match=r"cut\.jpg"):
        open_image(p)


def test_one_pixel(tmp_path: Path) -> None:
    p = _write(tmp_path / "dot.png", _png(Image.new("RGB", (1, 1))))
    with pytest.raises(errors.ImageTooSmallError, match=r"dot\.png"):
        open_image(p)


def test_decompression_bomb(tmp_path: Path) -> None:
    # A 1-bit 20000 x 20000 PNG is a few kB on disk and 400 M pixels decoded.
    p = _write(tmp_path / "bomb.png", _png(Image.new("1", (20000, 20000))))
    assert p.stat().st_size < 200_000
    with pytest.raises(errors.ImageTooLargeError, match=r"bomb\.png"):
        open_image(p)
    with pytest.raises(errors.ImageTooLargeError):
        open_image(_write(tmp_path / "big.png", _png(_rgb(100, 100))),
                   limits=ImageLimits(max_pixels=5000))


def test_grayscale_rgba_palette_become_rgb(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((20, 30), 77, np.uint8), mode="L")
    out = open_image(_write(tmp_path / "g.png", _png(gray)))
    assert out.mode == "RGB" and out.size == (30, 20)
    assert np.all(np.asarray(out) == 77)
    rgba = Image.new("RGBA", (30, 20), (10, 20, 30, 0))
    out = open_image(_write(tmp_path / "a.png", _png(rgba)))
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [10, 20, 30]
    pal = _rgb().convert("P")
    assert open_image(_write(tmp_path / "p.png", _png(pal))).mode == "RGB"


def test_sixteen_bit(tmp_path: Path) -> None:
    arr = np.full((20, 30), 65535 // 2, np.uint16)
    arr[0, 0] = 65535
    img = Image.fromarray(arr)
    out = np.asarray(open_image(_write(tmp_path / "deep.png", _png(img))))
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[5, 5, 0] == 127  # scaled by the 16-bit range


def test_exif_rotation(tmp_path: Path) -> None:
    img = _rgb(40, 20)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    out = open_image(_write(tmp_path / "rot.jpg", buf.getvalue()))
    assert out.size == (20, 40)  # displayed upright: portrait


def test_batch_quarantines_bad_files_and_finishes(tmp_path: Path) -> None:
    good = [_write(tmp_path / f"ok{i}.png", _png(_rgb(64, 64))) for i in range(3)]
    bad = {
        "empty.png": b"",
        "text.png": b"hello",
        "dot.png": _png(Image.new("RGB", (1, 1))),
    }
    paths = [good[0], *(_write(tmp_path / n, d) for n, d in bad.items()), good[1], good[2]]
    view = ModelView.from_data_config({"input_size": (3, 64, 64), "mean": (0.5,) * 3,
                                       "std": (0.5,) * 3, "crop_pct": 1.0,
                                       "interpolation": "bilinear"})
    results = list(sift_files(paths, view, workers=2, chunksize=1))
    assert [type(r) for r in results] == [ViewedKeypoints, Rejected, Rejected, Rejected,
                                          ViewedKeypoints, ViewedKeypoints]
    reasons = {Path(r.path).name: r.reason for r in results if isinstance(r, Rejected)}
    assert reasons == {"empty.png": "empty_file", "text.png": "not_an_image",
                       "dot.png": "too_small"}
