"""Causal check of a candidate shortcut by intervention (METHOD.md §3): remove its patches
and compare the drop in the class probability with removing as many random other patches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(images (B, 3, H, W), drop mask (B, N) bool) -> logits (B, C)."""


@dataclass(frozen=True)
class CausalResult:
    """Mean drop of the target-class probability when the candidate's patches are removed
    (``effect``) and when as many random non-candidate patches are (``random_effect``), over
    ``images`` images holding the candidate; one-sided Wilcoxon ``p_value``."""

    effect: float
    random_effect: float
    p_value: float
    images: int
    confirmed: bool


def matched_random_drop(candidate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: per image, as many patches as ``candidate`` marks, drawn uniformly from
    the patches it does not mark."""
    b, n = candidate.shape
    scores = torch.rand(b, n, generator=generator)
    scores[candidate] = 2.0  # never chosen before every non-candidate patch
    counts = candidate.sum(1)
    order = scores.argsort(1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n))
    return rank < counts[:, None]


@torch.no_grad()
def removal_effects(predict: Predictor, x: torch.Tensor, target: torch.Tensor,
                    candidate: torch.Tensor, trials: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B,): the drop of the target probability when ``candidate`` (B, N) is
    removed, and the mean drop over ``trials`` matched random removals."""

    def prob(drop: torch.Tensor) -> torch.Tensor:
        logits = predict(x, drop)
        return logits.softmax(-1).gather(1, target[:, None].to(logits.device))[:, 0].cpu()

    base = prob(torch.zeros_like(candidate))
    with_candidate = base - prob(candidate)
    random = torch.stack([base - prob(matched_random_drop(candidate, generator))
                          for _ in range(trials)]).mean(0)
    return with_candidate, random


@torch.no_grad()
def causal_check(predict: Predictor, x: torch.Tensor, target: torch.Tensor,
                 candidate: torch.Tensor, *, trials: int = 5, seed: int = 0,
                 alpha: float = 0.05, min_effect: float = 0.05) -> CausalResult:
    """Confirm a candidate when removing it lowers the target probability by at least
    ``min_effect`` more than matched random removals, significantly (p < ``alpha``)."""
    rows = candidate.any(1) & ~candidate.all(1)
    if not bool(rows.any()):
        return CausalResult(float("nan"), float("nan"), float("nan"), 0, False)
    x, target, candidate = x[rows], target[rows], candidate[rows]
    g = torch.Generator().manual_seed(seed)
    with_candidate, random = removal_effects(predict, x, target, candidate, trials, g)
    diff = (with_candidate - random).numpy().astype(np.float64)
    if np.allclose(diff, 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(diff, alternative="greater").pvalue)
    effect, rnd = float(with_candidate.mean()), float(random.mean())
    return CausalResult(effect, rnd, p, int(rows.sum()),
                        confirmed=p < alpha and effect - rnd >= min_effect)
