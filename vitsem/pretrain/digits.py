"""A pre-training benchmark on which masked-image pre-training matters (issue 13).

Ten classes: scikit-learn's bundled handwritten digits, upsampled, rotated and placed at a
random place on a random crop of scikit-image's bundled textures (brick, grass, gravel),
painted in a random colour that does not depend on the class (``background="smooth"``:
the generators' smooth gradient-and-blob backgrounds instead of textures). Colour, background and
position carry no label information, so an untrained encoder's mean-pooled features
classify poorly and the probe can only rise through features of the strokes. Train and test
images are drawn from disjoint digit instances (the first ``train_share`` of the bundled
digits and the rest). Everything is rendered in memory, deterministic given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from vitsem.data.composed import _background_sources, _digits, _hsv_to_rgb
from vitsem.data.shortcut import _background as smooth_background
from vitsem.errors import ConfigError


@dataclass(frozen=True)
class DigitTextureSpec:
    """``image_size`` px square images; ``n_train`` / ``n_test`` images; the digit is
    ``digit_frac`` (a range) of the image tall."""

    image_size: int = 32
    n_train: int = 3000
    n_test: int = 1000
    digit_frac: tuple[float, float] = (0.55, 0.8)
    train_share: float = 0.7
    background: Literal["textures", "smooth", "plain"] = "smooth"
    seed: int = 0

    def validate(self) -> None:
        if self.image_size < 16 or self.n_train < 10 or self.n_test < 10:
            raise ConfigError("image_size must be >= 16 and n_train, n_test >= 10")
        if not 0.0 < self.digit_frac[0] <= self.digit_frac[1] <= 1.0:
            raise ConfigError(f"digit_frac must be a range in (0, 1], got {self.digit_frac}")
        if self.background not in ("textures", "smooth", "plain"):
            raise ConfigError(f"background must be 'textures', 'smooth' or 'plain', got "
                              f"{self.background!r}")
        if not 0.0 < self.train_share < 1.0:
            raise ConfigError(f"train_share must be in (0, 1), got {self.train_share}")


def _texture(s: int, rng: np.random.Generator) -> np.ndarray:
    sources = _background_sources("textures")
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(rng.integers(min(h, w) // 8, min(h, w) // 3 + 1))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = cv2.resize(src[y0:y0 + side, x0:x0 + side], (s, s), interpolation=cv2.INTER_AREA)
    crop = crop.mean(-1, keepdims=True) * rng.uniform(0.6, 1.2, size=3)  # random tint
    return np.clip(crop + rng.uniform(-30, 30), 0, 255)


def render_digit(spec: DigitTextureSpec, glyph: np.ndarray, rng: np.random.Generator
                 ) -> np.ndarray:
    """One (s, s, 3) uint8 image of the 8 x 8 ``glyph`` (values in [0, 1])."""
    s = spec.image_size
    if spec.background == "plain":
        img = np.full((s, s, 3), rng.uniform(0, 60), np.float64)
    else:
        img = (_texture(s, rng) if spec.background == "textures"
               else np.clip(smooth_background(s, rng), 0, 255))
    d = int(rng.integers(round(spec.digit_frac[0] * s), round(spec.digit_frac[1] * s) + 1))
    up = cv2.resize(glyph, (d, d), interpolation=cv2.INTER_CUBIC)
    rot = cv2.getRotationMatrix2D(((d - 1) / 2, (d - 1) / 2), float(rng.uniform(-15, 15)), 1.0)
    up = cv2.warpAffine(up, rot, (d, d), flags=cv2.INTER_LINEAR)
    x0, y0 = (int(v) for v in rng.integers(0, s - d, size=2, endpoint=True))
    mask = np.zeros((s, s), np.uint8)
    mask[y0:y0 + d, x0:x0 + d] = up > 0.35
    under = img[mask > 0].mean() if mask.any() else 128.0
    value = rng.uniform(0.85, 1.0) if under < 128 else rng.uniform(0.1, 0.3)
    fill = _hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.0, 0.8)), value)
    img[mask > 0] = fill
    return np.clip(img + rng.normal(0, 3.0, size=img.shape), 0, 255).astype(np.uint8)


def digit_texture_images(spec: DigitTextureSpec = DigitTextureSpec()
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (M, s, s, 3) uint8, train labels (M,), test images, test labels)."""
    spec.validate()
    glyphs, targets = _digits()
    cut = round(spec.train_share * len(glyphs))
    out = []
    for split, (lo, hi, n) in enumerate(((0, cut, spec.n_train),
                                         (cut, len(glyphs), spec.n_test))):
        rng = np.random.default_rng([spec.seed, split, 13])
        pick = rng.integers(lo, hi, size=n)
        out.append(np.stack([render_digit(spec, glyphs[i], rng) for i in pick]))
        out.append(targets[pick].astype(np.int64))
    return out[0], out[1], out[2], out[3]
