"""A folder of hostile entries mixed with good images, for the hostile-input suite: names
that inject Markdown/HTML or break tables, names that are not UTF-8, files that are not
images, truncated and oversized images, links out of the folder, loops, FIFOs."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HOSTILE_NAMES = [
    "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))", "a|b|c",
    "<script>alert(1)<\u2215script>",
    "**bold** _it_", "# heading", "`code`", "$\\frac{1}{0}$", "x\ny", "tab\there",
    "'; DROP TABLE images; --", "%s%n%x", "\u202egnp.exe", "-rf", " lead", "trail ",
    "日本語", "🙂emoji", "back\\slash", "a&amp;b", "{{7*7}}", "dots..", "quote\"d", "\r\ncr",
]
"""Stems of file names that must stay inert text wherever they are shown."""

NON_UTF8 = [b"caf\xe9", b"\xff\xfe", b"bad\x80name"]
"""Stems that are not valid UTF-8 (Latin-1 and stray bytes)."""


@dataclass
class HostileFolder:
    root: Path
    classes: list[str]
    good: list[str] = field(default_factory=list)
    """Paths (as created) of every valid image, hostile name or not."""
    bad: dict[str, str] = field(default_factory=dict)
    """Path (as created) -> expected reason of every entry that must be rejected."""

    @property
    def hostile(self) -> int:
        return len(self.bad) + sum(1 for g in self.good if Path(g).stem.startswith("h"))


def _png(data: bytes, w: int, h: int, colour: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0,
                                                               0, 0))
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_hostile_folder(root: Path, sources: list[Path], classes: list[str],
                        outside: Path) -> HostileFolder:
    """``root/<class>/...`` with the good images of ``sources`` (some under hostile names)
    and over 60 hostile entries; ``outside`` is a folder beside it for links to escape to."""
    hf = HostileFolder(root, classes)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(sources[0].read_bytes())
    rng = np.random.default_rng(0)
    good_png = sources[0].read_bytes()
    base = Image.open(sources[0]).convert("RGB")

    def put(name: str | bytes, data: bytes, reason: str | None, cls: int) -> str:
        folder = root / classes[cls % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        path = os.fsdecode(os.path.join(os.fsencode(folder), os.fsencode(name)))
        with open(path, "wb") as f:
            f.write(data)
        if reason is None:
            hf.good.append(path)
        else:
            hf.bad[path] = reason
        return path

    # Good images: plain names, then hostile names (still valid images, must be processed).
    for i, src in enumerate(sources):
        put(f"g{i:02d}.png", src.read_bytes(), None, i)
    for i, stem in enumerate(HOSTILE_NAMES[::2]):
        put(f"h{i:02d}{stem}.png", sources[i % len(sources)].read_bytes(), None, i)
    for i, stem in enumerate(NON_UTF8):
        put(b"h-nonutf8-" + stem + b".png", sources[i].read_bytes(), None, i)
    put("h-gray.png", _encoded(base.convert("L"), "PNG"), None, 0)
    put("h-cmyk.jpg", _encoded(base.convert("CMYK"), "JPEG"), None, 1)
    put("h-palette.gif", _encoded(base.convert("P"), "GIF"), None, 2)

    # Bad contents under hostile names.
    for i, stem in enumerate(HOSTILE_NAMES[:12]):
        put(f"{stem}.png", b"", "empty_file", i)
    for i, stem in enumerate(HOSTILE_NAMES[12:]):
        put(f"{stem}.jpg", rng.bytes(300), "not_an_image", i)
    put(b"\xff-empty.png", b"", "empty_file", 0)
    put("cut.png", good_png[: len(good_png) // 2], "truncated", 1)
    put("sig-only.png", good_png[:8], "not_an_image", 2)
    put("claims-8000.png", _png(b"".join(b"\x00" + b"\x80" * 24000 for _ in range(10)),
                                8000, 8000), "truncated", 0)
    put("bomb.png", _png(b"\x00" * 10, 100_000, 100_000), "too_large", 1)
    put("tiny.png", _encoded(base.resize((4, 4)), "PNG"), "too_small", 2)
    put("sliver.png", _encoded(base.resize((1000, 2)), "PNG"), "too_small", 0)
    put("float.tif", _encoded(Image.fromarray(np.zeros((32, 32), np.float32), "F"), "TIFF"),
        "unsupported_mode", 1)
    put("cut.jpg", _encoded(base, "JPEG")[:200], "truncated", 2)
    for i, suffix in enumerate(("notes.txt", "data.json", "run.py", "README", "x.png.bak")):
        put(suffix, b"hello", "unsupported_suffix", i)

    # Entries that are not regular files, links, hidden things.
    first = root / classes[0]
    second = root / classes[1]

    def entry(path: Path, reason: str) -> None:
        hf.bad[str(path)] = reason

    (first / "dir.png").mkdir()
    entry(first / "dir.png", "not_a_regular_file")
    os.mkfifo(first / "fifo.png")
    entry(first / "fifo.png", "not_a_regular_file")
    os.symlink(first / "nothing-here.png", first / "dangling.png")
    entry(first / "dangling.png", "broken_symlink")
    os.symlink(first / "loop.png", first / "loop.png")
    entry(first / "loop.png", "broken_symlink")
    os.symlink(second, first / "to-dir")
    entry(first / "to-dir", "symlink_to_directory")
    os.symlink(root, second / "to-root.png")
    entry(second / "to-root.png", "symlink_to_directory")
    os.symlink("/dev/zero", second / "zero.png")
    entry(second / "zero.png", "symlink_outside_input")
    os.symlink(outside / "secret.png", second / "escape.png")
    entry(second / "escape.png", "symlink_outside_input")
    os.symlink("../../outside/secret.png", second / "relative-escape.png")
    entry(second / "relative-escape.png", "symlink_outside_input")
    (first / ".DS_Store").write_bytes(b"\x00\x00")
    entry(first / ".DS_Store", "hidden")
    (first / "._g00.png").write_bytes(good_png)
    entry(first / "._g00.png", "hidden")
    (root / ".hidden").mkdir()
    shutil.copy(sources[0], root / ".hidden" / "a.png")
    entry(root / ".hidden", "hidden")
    (root / "README.txt").write_text("a labelled folder")
    entry(root / "README.txt", "unsupported_suffix")
    # A good link: to an image inside the folder (processed, not rejected).
    os.symlink(first / "g00.png", second / "h-link-inside.png")
    hf.good.append(str(second / "h-link-inside.png"))
    # Nested folders are walked: the image counts for its first-level class.
    (first / "deeper" / "deepest").mkdir(parents=True)
    shutil.copy(sources[1], first / "deeper" / "deepest" / "g-nested.png")
    hf.good.append(str(first / "deeper" / "deepest" / "g-nested.png"))
    return hf
