"""Held-back shortcuts for the benchmark only: patterns, sizes and positions that
``vitsem.data`` never makes, so the audit's detection is checked beyond the generator it
was developed on. Nothing in ``vitsem`` imports this module, and no audit threshold was
set by looking at its results.

Each stamp draws onto an image (H, W, 3) uint8 in place and returns the stamp's pixels
(H, W) bool. ``fixed`` carries what is the same for every image of a data set (the noise
pattern, the bar's colours), drawn once from the data set's seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

from vitsem.data.composed import ComposedSpec, make_composed_dataset
from vitsem.data.shortcut import DATASET_INFO, MANIFEST, Sample

Stamp = Callable[[np.ndarray, np.random.Generator, np.random.Generator], np.ndarray]


def _corner_bar(img: np.ndarray, rng: np.random.Generator, fixed: np.random.Generator
                ) -> np.ndarray:
    """An L-shaped two-colour bar hugging the bottom-right corner (inside the crop)."""
    s = img.shape[0]
    m = round(0.07 * s)
    c1, c2 = fixed.uniform(0, 255, 3), fixed.uniform(0, 255, 3)
    mask = np.zeros(img.shape[:2], bool)
    mask[s - m - 5:s - m, s - m - 22:s - m] = True
    mask[s - m - 22:s - m, s - m - 5:s - m] = True
    yy, xx = np.nonzero(mask)
    img[yy, xx] = np.where(((yy + xx) // 3 % 2 == 0)[:, None], c1, c2)
    return mask


def _noise_stamp(img: np.ndarray, rng: np.random.Generator, fixed: np.random.Generator
                 ) -> np.ndarray:
    """The same 10 x 10 binary noise stamp, in the middle of the left edge."""
    s = img.shape[0]
    stamp = fixed.uniform(size=(5, 5)) < 0.5
    tile = np.kron(stamp, np.ones((2, 2), bool))
    y0, x0 = s // 2 - 5, round(0.07 * s)
    mask = np.zeros(img.shape[:2], bool)
    mask[y0:y0 + 10, x0:x0 + 10] = True
    img[y0:y0 + 10, x0:x0 + 10] = np.where(tile[..., None], 255, 0)
    return mask


def _logo_random(img: np.ndarray, rng: np.random.Generator, fixed: np.random.Generator
                 ) -> np.ndarray:
    """A small emblem (a ring with a triangle inside) at a random place."""
    s = img.shape[0]
    r = 6
    cx, cy = (int(v) for v in rng.integers(round(0.1 * s) + r, s - round(0.1 * s) - r, 2))
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(mask, (cx, cy), r, 1, -1)
    canvas = img.copy()
    cv2.circle(canvas, (cx, cy), r, (250, 200, 0), 2)
    tri = np.array([[cx, cy - 4], [cx - 4, cy + 3], [cx + 4, cy + 3]], np.int32)
    cv2.fillPoly(canvas, [tri], (20, 20, 160))
    img[mask > 0] = canvas[mask > 0]
    return mask > 0


def _frame(img: np.ndarray, rng: np.random.Generator, fixed: np.random.Generator
           ) -> np.ndarray:
    """A dashed black-and-white frame, 3 px wide, just inside the centre crop."""
    s = img.shape[0]
    m = round(0.07 * s)
    mask = np.zeros(img.shape[:2], bool)
    mask[m:s - m, m:m + 3] = mask[m:s - m, s - m - 3:s - m] = True
    mask[m:m + 3, m:s - m] = mask[s - m - 3:s - m, m:s - m] = True
    yy, xx = np.nonzero(mask)
    img[yy, xx] = np.where(((yy + xx) // 4 % 2 == 0)[:, None], 255, 0)
    return mask


def _text_tile(img: np.ndarray, rng: np.random.Generator, fixed: np.random.Generator
               ) -> np.ndarray:
    """A strip of repeated small text ("ok ok ok") along the top edge."""
    s = img.shape[0]
    m = round(0.07 * s)
    mask = np.zeros(img.shape[:2], bool)
    mask[m:m + 9, m:s - m] = True
    strip = np.full((9, s - 2 * m, 3), 255, np.uint8)
    cv2.putText(strip, "ok ok ok ok", (0, 8), cv2.FONT_HERSHEY_PLAIN, 0.6, (0, 0, 0), 1)
    img[m:m + 9, m:s - m] = strip
    return mask


FOREIGN: dict[str, Stamp] = {
    "corner_bar": _corner_bar,
    "noise_stamp": _noise_stamp,
    "logo_random": _logo_random,
    "frame": _frame,
    "text_tile": _text_tile,
}


def make_foreign_dataset(root: Path, kind: str, base: ComposedSpec) -> Path:
    """A composed data set without cue (``control``), then the ``kind`` stamp planted on
    class ``base.shortcut_class`` with probability ``base.rho`` in train/val and on half
    of the test images; the stamps' pixels are kept in ``cues.npz`` (scoring only)."""
    spec = replace(base, family="glyph", control=True)
    make_composed_dataset(root, spec, workers=2)
    rows = [Sample(**json.loads(line)) for line in (root / MANIFEST).read_text().splitlines()]
    fixed_seed = np.random.default_rng([base.seed, 99])
    fixed_state = fixed_seed.bit_generator.state
    cues: dict[str, np.ndarray] = {}
    out = []
    for i, row in enumerate(rows):
        rng = np.random.default_rng([base.seed, i, 17])
        target = row.label == base.shortcut_class
        u = rng.uniform()
        present = (target if u < base.rho else not target) if row.split != "test" else u < 0.5
        if present:
            path = root / row.file
            img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            fixed = np.random.default_rng()
            fixed.bit_generator.state = fixed_state  # the same stamp for every image
            mask = FOREIGN[kind](img, rng, fixed)
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            cues[row.file] = mask
            ys, xs = np.nonzero(mask)
            row = replace(row, shortcut=True, agrees=bool(target), cue="glyph",
                          cue_class=base.shortcut_class,
                          glyph_box=[int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                     int(ys.max()) + 1],
                          group=f"{row.class_name}|glyph")
        else:
            row = replace(row, shortcut=False, agrees=not target, cue=None, cue_class=None,
                          glyph_box=None, group=f"{row.class_name}|no-glyph")
        out.append(row)
    (root / MANIFEST).write_text("".join(json.dumps(asdict(r)) + "\n" for r in out))
    np.savez_compressed(root / "cues.npz", **{k.replace("/", "__"): v for k, v in cues.items()})
    info = json.loads((root / DATASET_INFO).read_text())
    info["foreign"] = kind
    (root / DATASET_INFO).write_text(json.dumps(info, indent=2))
    return root


def cue_masks(root: Path) -> dict[str, np.ndarray]:
    """The stamps' pixels by image file, as written by :func:`make_foreign_dataset`."""
    with np.load(root / "cues.npz") as z:
        return {k.replace("__", "/"): z[k] for k in z.files}
