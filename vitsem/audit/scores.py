"""Per-image audit scores on hand-checkable quantities."""

from __future__ import annotations

import numpy as np

from vitsem.method.concentration import TokenGrid


def patch_coverage(mask: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """(H, W) mask in the model view (bool or [0, 1]) -> (N,) share of each patch covered."""
    gh, gw = grid.grid_hw
    ph, pw = grid.patch_hw
    m = np.asarray(mask, np.float64)[: gh * ph, : gw * pw]
    if m.shape != (gh * ph, gw * pw):
        raise ValueError(f"mask {mask.shape} is smaller than the grid {gh * ph}x{gw * pw}")
    return m.reshape(gh, ph, gw, pw).mean((1, 3)).ravel()


def off_object_semantic_attention(attention: np.ndarray, semantic: np.ndarray,
                                  coverage: np.ndarray) -> np.ndarray:
    """Share of an attribution map that lands on keypoint patches outside the object.

    ``attention`` (B, N) maps, ``semantic`` (B, N) keypoint-patch indicator (c > 0),
    ``coverage`` (B, N) object share of each patch. A patch counts as outside in proportion
    to the part of it the object does not cover. Returns (B,) in [0, 1]."""
    a = np.asarray(attention, np.float64)
    total = a.sum(-1)
    off = (a * (np.asarray(semantic) > 0) * (1.0 - np.asarray(coverage, np.float64))).sum(-1)
    return np.divide(off, total, out=np.full_like(off, np.nan), where=total > 0)
