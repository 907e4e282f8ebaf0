"""Semantic concentration: keypoints mapped onto the model's token grid (METHOD.md §1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.special import ndtr

from vitsem.errors import ConfigError
from vitsem.method.keypoints import Keypoints


@dataclass(frozen=True)
class TokenGrid:
    """The patch grid: patch size (ph, pw) in pixels and grid (gh, gw); N = gh * gw patches,
    numbered row-major as the ViT flattens them."""

    patch_hw: tuple[int, int]
    grid_hw: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def patch_index(self, xy: np.ndarray) -> np.ndarray:
        """(K, 2) pixel centres -> (K,) flat patch index, -1 where outside the grid."""
        ph, pw = self.patch_hw
        gh, gw = self.grid_hw
        # OpenCV puts pixel centres at integer coordinates, so pixel column c spans
        # [c - 0.5, c + 0.5); shift by 0.5 to make patch p span [p*P, (p+1)*P).
        col = np.floor((xy[:, 0] + 0.5) / pw).astype(np.int64)
        row = np.floor((xy[:, 1] + 0.5) / ph).astype(np.int64)
        inside = (col >= 0) & (col < gw) & (row >= 0) & (row < gh)
        return np.where(inside, row * gw + col, -1)

    def positions(self) -> np.ndarray:
        """(N, 2) patch (row, col) coordinates in patch units."""
        gh, gw = self.grid_hw
        r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)

    def distances(self) -> np.ndarray:
        """(N, N) Euclidean distance between patch positions, in patch units."""
        pos = self.positions()
        return np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))


def _count(kps: Keypoints, grid: TokenGrid) -> np.ndarray:
    idx = grid.patch_index(kps.xy)
    return np.bincount(idx[idx >= 0], minlength=grid.num_patches).astype(np.float64)


def _response(kps: Keypoints, grid: TokenGrid) -> np.ndarray:
    idx = grid.patch_index(kps.xy)
    keep = idx >= 0
    return np.bincount(idx[keep], weights=kps.response[keep].astype(np.float64),
                       minlength=grid.num_patches)


def _scale(kps: Keypoints, grid: TokenGrid) -> np.ndarray:
    # Isotropic Gaussian of sigma = size / 2 per keypoint; separable, so the mass in patch
    # (r, c) is the product of its 1-D masses in row band r and column band c.
    ph, pw = grid.patch_hw
    gh, gw = grid.grid_hw
    if len(kps) == 0:
        return np.zeros(grid.num_patches)
    sigma = np.maximum(kps.size.astype(np.float64) / 2.0, 1e-6)[:, None]
    x = kps.xy[:, 0].astype(np.float64)[:, None] + 0.5
    y = kps.xy[:, 1].astype(np.float64)[:, None] + 0.5
    xe = np.arange(gw + 1, dtype=np.float64)[None, :] * pw
    ye = np.arange(gh + 1, dtype=np.float64)[None, :] * ph
    mx = np.diff(ndtr((xe - x) / sigma), axis=1)  # (K, gw)
    my = np.diff(ndtr((ye - y) / sigma), axis=1)  # (K, gh)
    return np.einsum("kr,kc->rc", my, mx).ravel()


WeightingFn = Callable[[Keypoints, TokenGrid], np.ndarray]

WEIGHTINGS: dict[str, WeightingFn] = {
    "count": _count,
    "response": _response,
    "scale": _scale,
}
"""Registry of concentration weightings (METHOD.md §1); default ``count``."""

Weighting = Literal["count", "response", "scale"]
"""The names of :data:`WEIGHTINGS`, as a type: option parsers and the Prefect UI offer them as
choices and refuse anything else before work starts."""

if set(get_args(Weighting)) != set(WEIGHTINGS):  # pragma: no cover - caught at import
    raise ImportError("Weighting must list exactly the keys of WEIGHTINGS")


@dataclass(frozen=True)
class SemanticConfig:
    """How keypoints become semantic concentration (METHOD.md §1), chosen once and shared by
    the analysis, the audit and pre-training. ``levels``: K concentration levels;
    ``level_thresholds``: fixed thresholds between the non-zero levels (``levels - 2`` values,
    e.g. data-set quantiles) instead of each image's own quantiles."""

    weighting: Weighting = "count"
    levels: int = 3
    level_thresholds: tuple[float, ...] | None = None

    def validate(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown weighting {self.weighting!r}; choose one of {sorted(WEIGHTINGS)}")
        if not 2 <= self.levels <= 8:
            raise ConfigError(f"levels must be in [2, 8], got {self.levels}")
        if self.level_thresholds is not None and len(self.level_thresholds) != self.levels - 2:
            raise ConfigError(f"{self.levels} levels need {self.levels - 2} thresholds, got "
                              f"{len(self.level_thresholds)}")

    def thresholds(self) -> np.ndarray | None:
        return None if self.level_thresholds is None else np.asarray(self.level_thresholds)


def concentration(kps: Keypoints, grid: TokenGrid, weighting: str = "count") -> np.ndarray:
    """Semantic concentration c, shape (N,), float64, of one image's keypoints."""
    try:
        fn = WEIGHTINGS[weighting]
    except KeyError:
        raise ConfigError(
            f"unknown weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}"
        ) from None
    return fn(kps, grid)


def patch_weights(c: np.ndarray) -> np.ndarray:
    """w = c / sum(c) along the last axis; all zero where an image has no keypoint
    (check ``c.sum(-1) > 0`` to tell those images apart)."""
    total = c.sum(axis=-1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c, dtype=np.float64), where=total > 0)


def concentration_levels(c: np.ndarray, num_levels: int = 3,
                         thresholds: np.ndarray | None = None) -> np.ndarray:
    """Bin patches into ``num_levels`` levels, (N,) -> (N,) int64 in [0, num_levels).

    Level 0 holds patches with no keypoint. The non-zero c are split into
    ``num_levels - 1`` bins at ``thresholds`` (ascending, ``num_levels - 2`` values; a value
    equal to a threshold goes to the lower bin), by default the image's own quantiles of
    its non-zero c (for K = 3: the median).
    """
    if num_levels < 2:
        raise ConfigError(f"num_levels must be >= 2, got {num_levels}")
    nz = c > 0
    levels = np.zeros(c.shape, np.int64)
    if not nz.any():
        return levels
    if thresholds is None:
        qs = np.arange(1, num_levels - 1) / (num_levels - 1)
        thresholds = np.quantile(c[nz], qs) if len(qs) else np.zeros(0)
    thresholds = np.asarray(thresholds, np.float64)
    if thresholds.shape != (num_levels - 2,):
        raise ConfigError(
            f"need {num_levels - 2} thresholds for {num_levels} levels, got {thresholds.shape}"
        )
    levels[nz] = 1 + np.searchsorted(thresholds, c[nz], side="left")
    return levels
