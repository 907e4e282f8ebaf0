"""Grow a candidate's patch set until it covers what the model uses.

A candidate marks the patches where its keypoints sit; a pattern the model relies on is
often larger (a bar, a frame, a logo whose flat parts hold no keypoint) or redundant (the
model still sees the rest of the pattern when a few of its tokens are gone). Removing only
the keypoint patches then changes little, and the causal check misses a real shortcut.

Growth builds nested patch sets per image, in this order:

1. the candidate's own patches (the seeds);
2. the connected component of attended patches (attribution above uniform, 1 / N) that
   touches the seeds, 8-connected on the grid;
3. then one ring of neighbours at a time (the 8-neighbourhood), which reaches flat parts
   of a pattern that hold no keypoint and so no attention weight in the semantic map.

Each set's *excess effect* is its removal effect minus that of as many random patches
(the quantity the causal check tests). The smallest set whose excess effect is within
``max(tol, rel_tol * largest)`` of the largest is kept: growth goes as far as the effect
still rises markedly and no further, since patches that add little more than random ones
would only blur the finding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitsem.audit.causal import Predictor, removal_effects
from vitsem.audit.discovery import dilate

__all__ = ["Growth", "attended_component", "grow_candidate"]


@dataclass(frozen=True)
class Growth:
    """``patches`` (B, N): the kept set; ``levels``: how many growth steps it took (0 = the
    seeds); ``excess`` and ``patch_counts``: excess effect and mean patches per image of
    every set tried, seeds first."""

    patches: np.ndarray
    levels: int
    excess: list[float]
    patch_counts: list[float]


def attended_component(seeds: np.ndarray, attended: np.ndarray, grid_hw: tuple[int, int],
                       max_patches: int) -> np.ndarray:
    """(B, N): ``seeds`` plus the attended patches 8-connected to them (flood fill through
    ``attended`` (B, N) bool), at most ``max_patches`` per image: a row whose component
    would exceed it keeps the last fill step that fits."""
    comp = seeds.copy()
    gh, gw = grid_hw
    for _ in range(gh * gw):
        new = comp | (dilate(comp, grid_hw) & attended)
        new[new.sum(1) > max_patches] = comp[new.sum(1) > max_patches]
        if (new == comp).all():
            break
        comp = new
    return comp


def grow_candidate(predict: Predictor, x: torch.Tensor, target: torch.Tensor,
                   seeds: np.ndarray, attribution: np.ndarray, grid_hw: tuple[int, int], *,
                   rings: int = 2, max_fraction: float = 0.5, tol: float = 0.02,
                   rel_tol: float = 0.05, trials: int = 2, seed: int = 0) -> Growth:
    """Grow ``seeds`` (B, N) bool over images ``x`` (B, 3, H, W) whose ``target`` class the
    candidate is tested against; ``attribution`` (B, N) decides what is attended. At most
    ``max_fraction`` of an image's patches are ever removed."""
    n = seeds.shape[1]
    cap = max(1, int(max_fraction * n))
    attended = np.asarray(attribution) > 1.0 / n
    sets = [seeds, attended_component(seeds, attended, grid_hw, cap)]
    for _ in range(rings):
        ring = dilate(sets[-1], grid_hw)
        ring[ring.sum(1) > cap] = sets[-1][ring.sum(1) > cap]
        sets.append(ring)
    g = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    excess: list[float] = []
    counts: list[float] = []
    for level, s in enumerate(sets):
        if kept and (s == sets[kept[-1]]).all():
            continue  # nothing added: the same effect
        eff, rnd = removal_effects(predict, x, target, torch.from_numpy(s), trials, g)
        kept.append(level)
        excess.append(float((eff - rnd).mean()))
        counts.append(float(s.sum(1).mean()))
    # Saturation: the smallest set within max(tol, rel_tol * best) of the best excess
    # effect; a ring that adds one or two points more than random is context, not pattern.
    top = max(excess)
    best = kept[next(i for i, e in enumerate(excess) if e >= top - max(tol, rel_tol * top))]
    return Growth(sets[best], best, excess, counts)
