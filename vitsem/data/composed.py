"""Offline benchmarks that look like the field's: a learnable core with a spurious cue.

The core is a handwritten digit from scikit-learn's bundled ``digits`` (8 x 8, upsampled,
rotated, placed at random, painted in a noisy class hue); the class is the digit.
Two families of cue:

- ``background`` (Waterbirds-style): the background is a crop of scikit-image's bundled
  textures or photographs; background family k goes with class k with probability
  ``rho`` in training (and in the held-out ``val`` split), uniformly at test time. A share
  of images (``clean_share`` at test time, ``train_clean_share`` in train and val) get a
  neutral background that belongs to no class: at test time, the shortcut-free images on
  which the core's accuracy is read (in training they keep that background in
  distribution, so the neutral test images measure the core, not a novel background).
- ``glyph``: a planted glyph of the shortcut registry (:data:`vitsem.data.shortcut.GLYPHS`),
  of a given size, in a corner or at a random place, present with class ``shortcut_class``
  with probability ``rho`` in training and ``val``, half of the time at test time.

``control=True`` plants no correlated cue: no glyph, or backgrounds of every family drawn
independently of the class (with the neutral share as usual). Masks (the digit), groups
and the cue's pixels are written for scoring only; the audit never reads them unless a
user passes masks. Written in the layout of :class:`vitsem.data.shortcut.ShortcutDataset`
(``dataset.json`` + ``manifest.jsonl``), with splits ``train``, ``val`` and ``test``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from vitsem.data.shortcut import (
    GLYPHS,
    Sample,
    _background,
    save_image_and_mask,
    write_manifest,
)
from vitsem.errors import ConfigError
from vitsem.method.keypoints import default_workers, parallel_map

COMPOSED_KIND = "vitsem-composed-benchmark"
COMPOSED_SPLITS = ("train", "val", "test")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "textures": ("brick", "grass", "gravel"),
    "photos": ("astronaut", "coffee", "chelsea", "rocket"),
    "cells": ("immunohistochemistry", "hubble_deep_field", "retina"),
}
"""Background families (scikit-image's bundled images); family k goes with class k."""


@dataclass(frozen=True)
class ComposedSpec:
    """Parameters of a composed benchmark; sizes in pixels unless a fraction of the image."""

    family: Literal["glyph", "background"] = "glyph"
    digits: tuple[int, ...] = (0, 1, 4)
    image_size: int = 64
    n_train: int = 1200
    n_val: int = 300
    n_test: int = 450
    rho: float = 0.95
    glyph: str = "checker"
    glyph_size: float = 0.2
    position: Literal["fixed", "random"] = "fixed"
    corner: int = 0
    clean_share: float = 0.34
    train_clean_share: float = 0.2
    shortcut_class: int = 0
    control: bool = False
    seed: int = 0

    def validate(self) -> None:
        if not 2 <= len(self.digits) <= len(BACKGROUNDS) or len(set(self.digits)) != len(
                self.digits) or not all(0 <= d <= 9 for d in self.digits):
            raise ConfigError(f"digits must be 2..{len(BACKGROUNDS)} distinct digits in 0-9, "
                             f"got {self.digits}")
        if self.family not in ("glyph", "background"):
            raise ConfigError(f"family must be 'glyph' or 'background', got {self.family!r}")
        if not 0.0 <= self.rho <= 1.0 or not 0.0 <= min(self.clean_share,
                                                          self.train_clean_share) < 1.0:
            raise ConfigError("rho must be in [0, 1] and the clean shares in [0, 1)")
        if self.glyph not in GLYPHS:
            raise ConfigError(f"unknown glyph {self.glyph!r}; choose one of {sorted(GLYPHS)}")
        if self.position not in ("fixed", "random") or not 0 <= self.corner < 4:
            raise ConfigError("position must be 'fixed' or 'random' and corner in 0..3")
        if not 0 <= self.shortcut_class < len(self.digits) or self.image_size < 48:
            raise ConfigError("shortcut_class must index digits and image_size be >= 48")

    @property
    def class_names(self) -> list[str]:
        return [DIGIT_NAMES[d] for d in self.digits]

    @property
    def num_classes(self) -> int:
        return len(self.digits)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@functools.cache
def _background_sources(family: str) -> tuple[np.ndarray, ...]:
    from skimage import data

    out = []
    for name in BACKGROUNDS[family]:
        img = np.asarray(getattr(data, name)(), np.float32)
        if img.ndim == 2:
            img = img[..., None].repeat(3, -1)
        out.append(img[..., :3])
    return tuple(out)


def _photo_background(family: str, s: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of one of the family's images, resized to (s, s, 3), gently recoloured
    (so colour alone is a weaker cue than the texture)."""
    sources = _background_sources(family)
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(rng.integers(min(h, w) // 4, min(h, w) // 2 + 1))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = cv2.resize(src[y0:y0 + side, x0:x0 + side], (s, s), interpolation=cv2.INTER_AREA)
    gain = rng.uniform(0.75, 1.15, size=3)
    return np.clip(crop * gain + rng.uniform(-20, 20), 0, 255)


def _digit_mask(digit: int, s: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """(s, s) uint8 mask of a random instance of ``digit``, 40-56% of the image tall (26-36
    px at 64 px), rotated up to 15 degrees, at a random place clear of the border crop; and
    its box."""
    images, targets = _digits()
    pool = np.flatnonzero(targets == digit)
    glyph = images[int(pool[rng.integers(len(pool))])]
    d = int(rng.integers(round(0.4 * s), round(0.56 * s) + 1))
    up = cv2.resize(glyph, (d, d), interpolation=cv2.INTER_CUBIC)
    rot = cv2.getRotationMatrix2D(((d - 1) / 2, (d - 1) / 2), float(rng.uniform(-15, 15)), 1.0)
    up = cv2.warpAffine(up, rot, (d, d), flags=cv2.INTER_LINEAR)
    margin = round(0.08 * s)
    x0, y0 = (int(v) for v in rng.integers(margin, s - margin - d, size=2, endpoint=True))
    mask = np.zeros((s, s), np.uint8)
    mask[y0:y0 + d, x0:x0 + d] = up > 0.35
    ys, xs = np.nonzero(mask)
    return mask, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _paint_digit(img: np.ndarray, mask: np.ndarray, label: int, num_classes: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The digit in its class's hue (blurred by noise, as real classes differ in colour as
    well as outline; a from-scratch tiny ViT on the CPU learns a shape-only core too slowly),
    bright on dark backgrounds and dark on bright ones, with a one-pixel outline of the
    opposite brightness."""
    under = img[mask > 0].mean() if mask.any() else 128.0
    hue = (label / num_classes + rng.normal(0, 0.06)) % 1.0
    value = rng.uniform(0.8, 1.0) if under < 128 else rng.uniform(0.3, 0.45)
    fill = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), value)
    edge = cv2.dilate(mask, np.ones((3, 3), np.uint8)) > mask
    out = img.copy()
    out[edge] = 255.0 - fill
    out[mask > 0] = fill
    return out


def _glyph_box(spec: ComposedSpec, obj_box: list[int], rng: np.random.Generator) -> list[int]:
    s = spec.image_size
    g = max(6, round(spec.glyph_size * s))
    margin = round(0.08 * s)
    if spec.position == "fixed":
        x0 = margin if spec.corner in (0, 2) else s - margin - g
        y0 = margin if spec.corner in (0, 1) else s - margin - g
        return [x0, y0, x0 + g, y0 + g]
    best: tuple[int, list[int]] | None = None
    for _ in range(30):
        x0, y0 = (int(v) for v in rng.integers(margin, s - margin - g, size=2, endpoint=True))
        box = [x0, y0, x0 + g, y0 + g]
        ox = max(0, min(box[2], obj_box[2]) - max(box[0], obj_box[0]))
        oy = max(0, min(box[3], obj_box[3]) - max(box[1], obj_box[1]))
        if best is None or ox * oy < best[0]:
            best = (ox * oy, box)
        if ox * oy == 0:
            break
    assert best is not None
    return best[1]


def _cue(spec: ComposedSpec, split: str, label: int, rng: np.random.Generator) -> int | None:
    """The cue's class for this image (the class it points to), None for no cue."""
    k = spec.num_classes
    u = rng.uniform()
    if spec.family == "glyph":
        target = label == spec.shortcut_class
        present = (target if u < spec.rho else not target) if split != "test" else u < 0.5
        return spec.shortcut_class if present else None
    if rng.uniform() < (spec.clean_share if split == "test" else spec.train_clean_share):
        return None
    if split == "test":
        return int(rng.integers(k))
    return label if u < spec.rho else int((label + rng.integers(1, k)) % k)


def render_composed(spec: ComposedSpec, split: str, index: int
                    ) -> tuple[np.ndarray, np.ndarray, Sample]:
    """One image (H, W, 3) uint8, its digit mask (H, W) uint8 (255 on the digit) and row."""
    rng = np.random.default_rng([spec.seed, COMPOSED_SPLITS.index(split), index, 7])
    s = spec.image_size
    label = int(rng.integers(spec.num_classes))
    cue = _cue(spec, split, label, rng)
    if spec.control:  # no correlation: no glyph, or a background family drawn at random
        cue = None if spec.family == "glyph" or cue is None else int(
            rng.integers(spec.num_classes))
    families = list(BACKGROUNDS)
    if spec.family == "background" and cue is not None:
        img = _photo_background(families[cue], s, rng)
        bg_name = families[cue]
    else:
        img = np.clip(_background(s, rng), 0, 255)
        bg_name = "neutral"
    mask, obj_box = _digit_mask(spec.digits[label], s, rng)
    img = _paint_digit(img, mask, label, spec.num_classes, rng)
    glyph_box = None
    if spec.family == "glyph" and cue is not None:
        fn = GLYPHS[spec.glyph]
        if fn is not None:
            glyph_box = _glyph_box(spec, obj_box, rng)
            x0, y0, x1, y1 = glyph_box
            img[y0:y1, x0:x1] = fn(x1 - x0, rng)
        else:
            cue = None
    img = np.clip(img + rng.normal(0, 2.0, size=img.shape), 0, 255).astype(np.uint8)
    name = spec.class_names[label]
    if spec.family == "glyph":
        group = f"{name}|{'glyph' if cue is not None else 'no-glyph'}"
    else:
        group = f"{name}|bg-{bg_name}"
    stem = f"{split}/{index:06d}.png"
    sample = Sample(
        file=f"images/{stem}", mask=f"masks/{stem}", split=split, label=label,
        class_name=name, shortcut=cue is not None, agrees=cue == label if cue is not None
        else False, group=group, object_box=obj_box, glyph_box=glyph_box,
        cue=None if cue is None else spec.family, cue_class=cue)
    return img, mask * 255, sample


def _write(job: tuple[ComposedSpec, str, int, str]) -> dict[str, Any]:
    spec, split, index, root = job
    img, mask, sample = render_composed(spec, split, index)
    return save_image_and_mask(root, sample, img, mask)


def make_composed_dataset(out_dir: str | Path, spec: ComposedSpec = ComposedSpec(), *,
                          workers: int | None = None) -> Path:
    """Write images, masks, ``manifest.jsonl`` and ``dataset.json`` under ``out_dir``."""
    spec.validate()
    root = Path(out_dir)
    counts = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    for split in COMPOSED_SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(spec, split, i, str(root)) for split in COMPOSED_SPLITS
            for i in range(counts[split])]
    rows = list(parallel_map(_write, jobs, default_workers() if workers is None else workers,
                             chunksize=64))
    write_manifest(root, rows, {"kind": COMPOSED_KIND, "version": 1, "spec": asdict(spec),
                                "class_names": spec.class_names, "counts": counts})
    return root
