"""Faithfulness of an attribution map, measured the same way for every map.

- **Deletion curves with true token removal**: patches are removed from the token sequence
  (:func:`vitsem.audit.tokens.predict_without`, no grey-out that the model never saw) in
  order of the map, most relevant first (MoRF) and least relevant first (LeRF); the curve is
  the probability of the class the model predicts on the intact image. **ABPC** (area
  between the perturbation curves) is the mean of LeRF - MoRF over the removal fractions:
  large when the map ranks what the model uses first.
- **Localisation of a planted pattern** (benchmarks only, where the pattern's patches are
  known): per image, the AUROC of the map against the pattern's patches and the pointing
  game (is the map's top patch a pattern patch?).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from vitsem.audit.causal import Predictor

__all__ = ["Faithfulness", "deletion_curves", "deletion_orders", "faithfulness",
           "pattern_localisation"]


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval of per-image values (NaNs ignored)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return m, m - half, m + half


@dataclass(frozen=True)
class Faithfulness:
    """One map's faithfulness. ``fractions`` (S,) of patches removed; ``morf``/``lerf``
    (S,) mean target probability along each deletion order; ``abpc`` mean over images of
    mean_k (LeRF_k - MoRF_k) with its 95% interval ``abpc_ci``; ``auroc`` and ``pointing``
    the localisation of a planted pattern (NaN when no pattern is known), over
    ``located`` images that hold one."""

    fractions: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    abpc: float
    abpc_ci: tuple[float, float]
    images: int
    auroc: float = float("nan")
    auroc_ci: tuple[float, float] = (float("nan"), float("nan"))
    pointing: float = float("nan")
    located: int = 0
    per_image_abpc: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def summary(self) -> dict[str, Any]:
        return {"abpc": self.abpc, "abpc_ci": list(self.abpc_ci), "images": self.images,
                "fractions": self.fractions.tolist(), "morf": self.morf.tolist(),
                "lerf": self.lerf.tolist(), "auroc": self.auroc, "auroc_ci": list(self.auroc_ci),
                "pointing": self.pointing, "located": self.located}


def deletion_orders(attribution: np.ndarray, seed: int = 0) -> np.ndarray:
    """(B, N) patch indices, most relevant first; ties in random (seeded) order so a flat
    map is not read in raster order."""
    a = np.asarray(attribution, np.float64)
    jitter = np.random.default_rng(seed).random(a.shape)
    return np.lexsort((jitter, -a), axis=-1)


@torch.no_grad()
def deletion_curves(predict: Predictor, x: torch.Tensor, attribution: np.ndarray,
                    target: np.ndarray, steps: int = 8, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image deletion curves (B, S) for MoRF and LeRF, with the removal ``fractions``
    (S,) = k / steps for k = 0 .. steps - 1 (never every patch). One batched forward per
    fraction and order."""
    b, n = attribution.shape
    order = torch.from_numpy(deletion_orders(attribution, seed))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n))  # rank[i, j]: place of patch j
    tgt = torch.as_tensor(target, dtype=torch.long)[:, None]
    fractions = np.arange(steps) / steps
    curves = np.zeros((2, b, steps))
    for k, f in enumerate(fractions):
        m = round(f * n)
        for o, drop in enumerate((rank < m, rank >= n - m)):  # MoRF, LeRF
            probs = predict(x, drop).softmax(-1).cpu()
            curves[o, :, k] = probs.gather(1, tgt)[:, 0].numpy()
    return fractions, curves[0], curves[1]


def pattern_localisation(attribution: np.ndarray, pattern: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per image holding a pattern (``pattern`` (B, N) bool, not all True): AUROC of the
    map against the pattern's patches (ties count half) and the pointing-game hit (the top
    patch is a pattern patch; with tied top patches, the share of them that are).
    Returns two (B,) arrays, NaN where no pattern is known."""
    a = np.asarray(attribution, np.float64)
    pos = np.asarray(pattern, bool)
    n_pos, n_neg = pos.sum(1), (~pos).sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    ranks = rankdata(a, axis=1)  # ties get their average rank
    u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
    auc = np.where(valid, u / np.maximum(n_pos * n_neg, 1), np.nan)
    # Pointing: the share of the top-valued patches that are pattern patches, i.e. the hit
    # rate under random tie-breaking (a flat map must not score by raster order).
    tops = a == a.max(1, keepdims=True)
    hit = np.where(valid, (tops & pos).sum(1) / tops.sum(1), np.nan)
    return auc, hit


def faithfulness(predict: Predictor, x: torch.Tensor, attribution: np.ndarray,
                 target: np.ndarray, pattern: np.ndarray | None = None, steps: int = 8,
                 seed: int = 0) -> Faithfulness:
    """Deletion curves, ABPC and (with ``pattern`` (B, N) bool) localisation of one map."""
    fractions, morf, lerf = deletion_curves(predict, x, attribution, target, steps, seed)
    per_image = (lerf - morf).mean(1)
    abpc, lo, hi = _interval(per_image)
    out = Faithfulness(fractions, morf.mean(0), lerf.mean(0), abpc, (lo, hi), len(x),
                       per_image_abpc=per_image)
    if pattern is None:
        return out
    auc, hit = pattern_localisation(attribution, pattern)
    m, alo, ahi = _interval(auc)
    located = int(np.isfinite(auc).sum())
    point = float(np.nanmean(hit)) if located else float("nan")
    return Faithfulness(fractions, out.morf, out.lerf, abpc, (lo, hi), len(x), m, (alo, ahi),
                        point, located, per_image)
