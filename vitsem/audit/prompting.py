"""Prompting at inference (METHOD.md §3): outcomes of removing patch tokens, by group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vitsem.audit.causal import matched_random_drop
from vitsem.audit.results import PromptOutcome
from vitsem.method.training import group_accuracy


def prompt_outcome(pred: np.ndarray, base: np.ndarray, labels: np.ndarray,
                   groups: Sequence[str], clean: np.ndarray | None, removed: np.ndarray
                   ) -> PromptOutcome:
    groups_acc = group_accuracy(pred, labels, groups)
    worst = min(groups_acc, key=lambda g: groups_acc[g])
    clean_acc = (float((pred[clean] == labels[clean]).mean())
                 if clean is not None and clean.any() else None)
    return PromptOutcome(float((pred == labels).mean()), groups_acc[worst], worst, groups_acc,
                         clean_acc, float(removed.sum(1).mean()), float((pred != base).mean()))


def keep_top_k(weights: np.ndarray, keep: int) -> np.ndarray:
    """(B, N) bool removal mask that keeps each image's ``keep`` most semantic patches;
    images without keypoints keep everything."""
    b, n = weights.shape
    order = np.argsort(-weights, axis=1, kind="stable")
    drop = np.ones((b, n), bool)
    np.put_along_axis(drop, order[:, :keep], False, 1)
    drop[weights.sum(1) == 0] = False
    return drop


def matched_random(removed: np.ndarray, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return matched_random_drop(torch.from_numpy(removed), g).numpy()


def safe_removal(drop: np.ndarray) -> np.ndarray:
    """Never remove every patch of an image: such rows keep all patches instead."""
    out = drop.copy()
    out[out.all(1)] = False
    return out
