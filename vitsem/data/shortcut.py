"""The shipped benchmark: textured shapes on varied backgrounds with a planted shortcut.

Each image holds one object of K classes (a shape with its class's texture family, random
colours, size, position and rotation) on a smooth background. A
small, keypoint-rich *glyph* (the shortcut) is planted so that, in training, "glyph
present" agrees with "label == shortcut_class" with probability ``rho``; at test time it
is independent of the label (``decorrelated``) or agrees with probability 1 - rho
(``reversed``). Groups are (class, glyph present). Everything is deterministic by seed:
image i of a split draws from its own generator seeded by (seed, split, i).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from vitsem.errors import ConfigError, DatasetError
from vitsem.method.keypoints import default_workers, parallel_map

SHAPES = ("disc", "square", "triangle", "cross", "ring", "star")
SPLITS = ("train", "test")
MANIFEST = "manifest.jsonl"
DATASET_INFO = "dataset.json"


def _checker(size: int, rng: np.random.Generator) -> np.ndarray:
    cells = 4
    idx = (np.arange(size) * cells // size)
    board = (idx[:, None] + idx[None, :]) % 2
    return np.where(board[..., None] > 0, 255, 0).astype(np.uint8).repeat(3, -1)


def _text(size: int, rng: np.random.Generator) -> np.ndarray:
    tile = np.full((size, size, 3), 255, np.uint8)
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    (w, h), _ = cv2.getTextSize("TM", font, 1.0, thick)
    scale = (size - 2) / max(w, h)
    (w, h), _ = cv2.getTextSize("TM", font, scale, thick)
    org = ((size - w) // 2, (size + h) // 2)
    cv2.putText(tile, "TM", org, font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    cv2.rectangle(tile, (0, 0), (size - 1, size - 1), (0, 0, 0), 1)
    return tile


def _bullseye(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    rings = (np.sqrt(xx**2 + yy**2) // max(1.0, size / 8)) % 2
    return np.where(rings[..., None] > 0, 255, 0).astype(np.uint8).repeat(3, -1)


GLYPHS: dict[str, Callable[[int, np.random.Generator], np.ndarray] | None] = {
    "checker": _checker,
    "text": _text,
    "bullseye": _bullseye,
    "none": None,
}
"""Registry of shortcut glyphs; ``none`` is the control with no planted shortcut."""


@dataclass(frozen=True)
class ShortcutSpec:
    """Parameters of a generated benchmark; sizes in pixels."""

    num_classes: int = 3
    image_size: int = 64
    n_train: int = 1500
    n_test: int = 600
    rho: float = 0.95
    glyph: str = "checker"
    glyph_size: float = 0.2
    position: Literal["fixed", "random"] = "fixed"
    test_mode: Literal["decorrelated", "reversed"] = "decorrelated"
    shortcut_class: int = 0
    seed: int = 0

    def validate(self) -> None:
        if not 2 <= self.num_classes <= len(SHAPES):
            raise ConfigError(f"num_classes must be in [2, {len(SHAPES)}], got {self.num_classes}")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must be in [0, 1], got {self.rho}")
        if self.glyph not in GLYPHS:
            raise ConfigError(f"unknown glyph {self.glyph!r}; choose one of {sorted(GLYPHS)}")
        if self.position not in ("fixed", "random"):
            raise ConfigError(f"position must be 'fixed' or 'random', got {self.position!r}")
        if self.test_mode not in ("decorrelated", "reversed"):
            raise ConfigError(f"test_mode must be 'decorrelated' or 'reversed', got "
                             f"{self.test_mode!r}")
        if not 0 <= self.shortcut_class < self.num_classes:
            raise ConfigError(f"shortcut_class must be in [0, {self.num_classes})")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES[: self.num_classes])


@dataclass
class Sample:
    """One manifest row. Boxes are [x0, y0, x1, y1] pixels in the stored image."""

    file: str
    mask: str
    split: str
    label: int
    class_name: str
    shortcut: bool
    agrees: bool
    group: str
    object_box: list[int]
    glyph_box: list[int] | None = field(default=None)
    cue: str | None = None
    """Kind of spurious cue in the image (``glyph``, ``background``; None: none or, in
    older manifests, read ``glyph_box``)."""
    cue_class: int | None = None
    """The class the cue points to (None: no cue)."""


def _background(s: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:s, :s] / (s - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    blobs = cv2.resize(rng.normal(0, 18, size=(4, 4, 3)), (s, s), interpolation=cv2.INTER_CUBIC)
    return img + blobs


def _shape_mask(label: int, s: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    r = rng.uniform(0.2, 0.28) * s
    cx, cy = rng.uniform(r + 2, s - r - 2, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((s, s), np.uint8)
    name = SHAPES[label]

    def poly(k: int, radii: np.ndarray) -> np.ndarray:
        ang = rot + np.arange(k) * 2 * np.pi / k
        return np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], 1).astype(np.int32)

    if name == "disc":
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
    elif name == "ring":
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
        cv2.circle(mask, (int(cx), int(cy)), int(r * 0.5), 0, -1)
    elif name == "square":
        cv2.fillPoly(mask, [poly(4, np.full(4, r * 1.1))], 1)
    elif name == "triangle":
        cv2.fillPoly(mask, [poly(3, np.full(3, r * 1.2))], 1)
    elif name == "star":
        cv2.fillPoly(mask, [poly(10, np.tile([r * 1.15, r * 0.5], 5))], 1)
    else:  # cross
        w = r * 0.38
        for a in (rot, rot + np.pi / 2):
            d = np.array([np.cos(a), np.sin(a)])
            n = np.array([-d[1], d[0]])
            c = np.array([cx, cy])
            pts = np.stack([c + d * r + n * w, c + d * r - n * w, c - d * r - n * w,
                            c - d * r + n * w]).astype(np.int32)
            cv2.fillPoly(mask, [pts], 1)
    ys, xs = np.nonzero(mask)
    return mask, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) -> RGB in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return 255.0 * (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _texture(label: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """Each class has its own texture family (random colours, angle and period), as real
    object classes differ in surface as well as outline."""
    # A class hue, blurred by noise so colour alone does not decide the class (a tiny ViT
    # trained from scratch on the CPU needs some cue it can learn in minutes besides shape).
    hue = (label / 6.0 + rng.normal(0, 0.08)) % 1.0
    c1 = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    c2 = _hsv_to_rgb(hue, rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.4))
    period = rng.uniform(4, 7)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:s, :s].astype(np.float64)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    kind = label % 6
    if kind == 0:  # stripes
        on = u % period < period / 2
    elif kind == 1:  # dots
        on = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period / 3) ** 2
    elif kind == 2:  # crosshatch
        on = (u % period < period / 3) | (v % period < period / 3)
    elif kind == 3:  # waves
        on = (u + 2 * np.sin(v / 2)) % period < period / 2
    elif kind == 4:  # plain with a few speckles
        on = rng.uniform(size=(s, s)) < 0.08
    else:  # coarse blocks
        on = ((u // period) + (v // period)) % 2 == 0
    return np.where(on[..., None], c1, c2)


def _glyph_box(spec: ShortcutSpec, obj_box: list[int], rng: np.random.Generator) -> list[int]:
    s = spec.image_size
    g = max(8, round(spec.glyph_size * s))
    margin = round(0.1 * s)  # inside the centre crop of the usual eval transform
    if spec.position == "fixed":
        return [margin, margin, margin + g, margin + g]
    best = None
    for _ in range(20):
        x0, y0 = rng.integers(margin, s - margin - g, size=2, endpoint=True)
        box = [int(x0), int(y0), int(x0) + g, int(y0) + g]
        ox = max(0, min(box[2], obj_box[2]) - max(box[0], obj_box[0]))
        oy = max(0, min(box[3], obj_box[3]) - max(box[1], obj_box[1]))
        if best is None or ox * oy < best[0]:
            best = (ox * oy, box)
        if ox * oy == 0:
            break
    assert best is not None
    return best[1]


def render_sample(spec: ShortcutSpec, split: str, index: int
                  ) -> tuple[np.ndarray, np.ndarray, Sample]:
    """Render one image (H, W, 3) uint8, its object mask (H, W) uint8 and manifest row."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    s = spec.image_size
    label = int(rng.integers(spec.num_classes))
    img = _background(s, rng)
    mask, obj_box = _shape_mask(label, s, rng)
    img = np.where(mask[..., None] > 0, _texture(label, s, rng), img)
    is_target = label == spec.shortcut_class
    u = rng.uniform()
    if split == "train":
        present = is_target if u < spec.rho else not is_target
    elif spec.test_mode == "decorrelated":
        present = u < 0.5
    else:
        present = is_target if u >= spec.rho else not is_target
    glyph_fn = GLYPHS[spec.glyph]
    glyph_box = None
    if glyph_fn is None:
        present = False
    elif present:
        glyph_box = _glyph_box(spec, obj_box, rng)
        x0, y0, x1, y1 = glyph_box
        img[y0:y1, x0:x1] = glyph_fn(x1 - x0, rng)
    img = np.clip(img + rng.normal(0, 2.0, size=img.shape), 0, 255).astype(np.uint8)
    stem = f"{split}/{index:06d}.png"
    name = spec.class_names[label]
    sample = Sample(
        file=f"images/{stem}", mask=f"masks/{stem}", split=split, label=label, class_name=name,
        shortcut=bool(present), agrees=bool(present == is_target),
        group=f"{name}|{'glyph' if present else 'no-glyph'}", object_box=obj_box,
        glyph_box=glyph_box,
    )
    return img, mask * 255, sample


def save_image_and_mask(root: str | Path, sample: Sample, img: np.ndarray, mask: np.ndarray
                        ) -> dict[str, Any]:
    """Write a sample's (H, W, 3) RGB image and (H, W) mask as PNGs, each atomically (a
    killed writer leaves no half file under the final name); returns its manifest row."""
    for rel, arr in ((sample.file, cv2.cvtColor(img, cv2.COLOR_RGB2BGR)), (sample.mask, mask)):
        target = Path(root) / rel
        tmp = target.with_name(target.name + ".tmp.png")
        cv2.imwrite(str(tmp), arr)
        tmp.replace(target)
    return asdict(sample)


def write_manifest(root: Path, rows: Iterable[object], info: dict[str, Any]) -> Path:
    """``manifest.jsonl`` (one row per sample, atomically) and ``dataset.json`` under ``root``."""
    tmp = root / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(root / MANIFEST)
    (root / DATASET_INFO).write_text(json.dumps(info, indent=2))
    return root


def _write_sample(job: tuple[ShortcutSpec, str, int, str]) -> dict[str, Any]:
    spec, split, index, root = job
    img, mask, sample = render_sample(spec, split, index)
    return save_image_and_mask(root, sample, img, mask)


def make_shortcut_dataset(out_dir: str | Path, spec: ShortcutSpec = ShortcutSpec(), *,
                          workers: int | None = None) -> Path:
    """Write images, masks, ``manifest.jsonl`` and ``dataset.json`` under ``out_dir``."""
    spec.validate()
    root = Path(out_dir)
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(spec, split, i, str(root)) for split, n in (("train", spec.n_train),
                                                           ("test", spec.n_test))
            for i in range(n)]
    n_workers = default_workers() if workers is None else workers
    rows = list(parallel_map(_write_sample, jobs, n_workers, chunksize=64))
    return write_manifest(root, rows, {
        "kind": "vitsem-shortcut-benchmark", "version": 1, "spec": asdict(spec),
        "class_names": spec.class_names, "counts": {"train": spec.n_train, "test": spec.n_test}})


@dataclass
class ShortcutDataset:
    """A generated benchmark on disk."""

    root: Path
    spec: Any
    """A :class:`ShortcutSpec`, or a :class:`vitsem.data.composed.ComposedSpec` for the
    composed benchmarks; both name ``image_size``, ``class_names`` and ``shortcut_class``."""
    samples: list[Sample]

    @classmethod
    def load(cls, root: str | Path) -> ShortcutDataset:
        r = Path(root)
        info_path, manifest = r / DATASET_INFO, r / MANIFEST
        if not info_path.is_file() or not manifest.is_file():
            raise DatasetError(
                f"{r}: not a vitsem benchmark folder (needs {DATASET_INFO} and {MANIFEST}); "
                "create one with `vitsem data make`"
            )
        info = json.loads(info_path.read_text())
        spec: Any
        if info.get("kind") == "vitsem-composed-benchmark":
            from vitsem.data.composed import ComposedSpec  # the composed module imports this

            spec = ComposedSpec(**{**info["spec"], "digits": tuple(info["spec"]["digits"])})
        else:
            spec = ShortcutSpec(**info["spec"])
        samples = [Sample(**json.loads(line)) for line in manifest.read_text().splitlines()
                   if line.strip()]
        return cls(r, spec, samples)

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def paths(self, split: str) -> Iterator[Path]:
        return (self.root / s.file for s in self.split(split))
