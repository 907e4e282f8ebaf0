"""The audit on the shipped shortcut benchmark, where the truth is known: loading a split as
:class:`AuditData` and scoring findings against the planted glyph."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image
from scipy.stats import rankdata

from vitsem.audit.pipeline import AuditData, Finding
from vitsem.audit.scores import patch_coverage
from vitsem.data.shortcut import Sample, ShortcutDataset
from vitsem.method.concentration import TokenGrid
from vitsem.method.images import open_image
from vitsem.method.keypoints import Keypoints, SiftParams, detect_sift, parallel_map
from vitsem.method.view import ModelView

AUDIT_SIFT = SiftParams(descriptors=True)
"""SIFT with descriptors: recurring-pattern discovery compares descriptors."""


def view_mask(mask: np.ndarray, view: ModelView) -> np.ndarray:
    """(h, w) mask of a stored image -> (H, W) bool in the model view (same resize/crop)."""
    img = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
    return view.geometry_array(img)[..., 0] > 127


def box_mask(box: Sequence[int] | None, hw: tuple[int, int]) -> np.ndarray:
    out = np.zeros(hw, bool)
    if box is not None:
        x0, y0, x1, y1 = box
        out[y0:y1, x0:x1] = True
    return out


def _cue_pixels(sample: Sample, object_mask: np.ndarray, hw: tuple[int, int],
                view: ModelView) -> np.ndarray:
    """(H, W) bool in the model view: the pixels of the image's spurious cue (the glyph's
    box, or the background outside the object); all False without a cue."""
    if sample.cue == "background":
        return ~object_mask
    return view_mask(box_mask(sample.glyph_box, hw), view)


@dataclass
class BenchmarkAudit:
    """A benchmark split ready to audit, with ``truth`` (B, N): the share of each patch the
    spurious cue covers, and ``cue_class`` (B,): the class the cue points to (-1: no cue).
    Both are for scoring only."""

    data: AuditData
    samples: list[Sample]
    truth: np.ndarray
    cue_class: np.ndarray


def _load_one(job: tuple[str, str, ModelView, SiftParams]) -> tuple[np.ndarray, np.ndarray,
                                                                     Keypoints]:
    image, mask, view, sift = job
    v = view.geometry_array(open_image(image))
    return v, view_mask(np.asarray(Image.open(mask).convert("L")), view), detect_sift(v, sift)


def load_benchmark(root: str | Path, split: str, view: ModelView, grid: TokenGrid,
                   sift: SiftParams = AUDIT_SIFT, workers: int = 1) -> BenchmarkAudit:
    """A split of a benchmark folder as audit data, with masks, groups and the glyph truth."""
    ds = ShortcutDataset.load(root)
    samples = ds.split(split)
    jobs = [(str(ds.root / s.file), str(ds.root / s.mask), view, sift) for s in samples]
    loaded = cast(list[tuple[np.ndarray, np.ndarray, Keypoints]],
                  list(parallel_map(_load_one, jobs, workers, chunksize=32)))
    views = np.stack([v for v, _, _ in loaded])
    hw = (ds.spec.image_size, ds.spec.image_size)
    masks = np.stack([m for _, m, _ in loaded])
    truth = np.stack([patch_coverage(_cue_pixels(s, m, hw, view), grid)
                      for s, m in zip(samples, masks, strict=True)])
    data = AuditData(
        views=views, keypoints=[k for _, _, k in loaded],
        labels=np.array([s.label for s in samples], np.int64), class_names=ds.class_names,
        groups=[s.group for s in samples], masks=masks,
        clean=np.array([not s.shortcut for s in samples]), names=[s.file for s in samples])
    cue_class = np.array([s.cue_class if s.cue_class is not None else
                          ds.spec.shortcut_class if s.glyph_box is not None else -1
                          for s in samples])
    return BenchmarkAudit(data, samples, truth, cue_class)


def _near(cue: np.ndarray, grid_hw: tuple[int, int] | None) -> np.ndarray:
    """(B, N) cue patches and their 8 neighbours: a cue rarely sits on patch borders, so a
    finding that covers it also marks the patches it overlaps by a few pixels."""
    from vitsem.audit.discovery import dilate

    n = cue.shape[1]
    if grid_hw is None:
        side = round(float(np.sqrt(n)))
        grid_hw = (side, n // side)
    return dilate(cue, grid_hw)


def is_planted_cue(finding: Finding, truth: np.ndarray, cue_class: np.ndarray,
                   min_precision: float = 0.5, min_recall: float = 0.5,
                   grid_hw: tuple[int, int] | None = None) -> bool:
    """A finding is the planted cue when, over the images it marks, at least
    ``min_precision`` of its patches are on or next to a patch (>= 25%) covered by a cue
    that points to the finding's class, and it marks at least ``min_recall`` of those cue
    patches (a finding that sits on a corner of the cue does not cover what the model
    uses)."""
    marked = finding.patches
    rows = marked.any(1)
    if not rows.any():
        return False
    cue = (truth >= 0.25) & (np.asarray(cue_class) == finding.cls)[:, None]
    precision = float(_near(cue, grid_hw)[marked].mean())
    on_cue = cue[rows]
    recall = float(marked[rows][on_cue].mean()) if on_cue.any() else 0.0
    return precision >= min_precision and recall >= min_recall


def is_planted(finding: Finding, truth: np.ndarray, shortcut_class: int,
               min_precision: float = 0.5, min_recall: float = 0.5) -> bool:
    """:func:`is_planted_cue` for a glyph that points to ``shortcut_class`` wherever it is
    (``truth`` > 0)."""
    cue_class = np.where((truth >= 0.25).any(1), shortcut_class, -1)
    return is_planted_cue(finding, truth, cue_class, min_precision, min_recall)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney, ties count
    half); NaN when either class is absent."""
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
