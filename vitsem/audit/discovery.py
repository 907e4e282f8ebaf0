"""Recurring-pattern discovery without annotations (METHOD.md §3).

The SIFT descriptors of keypoints in each image's most-attended patches are clustered per
predicted class; a cluster is a *candidate shortcut* when it recurs across many images of
one class and is rare in the other classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """A recurring descriptor pattern of predicted class ``cls``.

    ``recurrence``: share of the class's images with the pattern in a top-attended patch;
    ``other_rate``: share of other classes' images with it anywhere; ``attention_lift``:
    mean attention on its patches over uniform (1 / N); ``radius``: match distance."""

    cls: int
    centroid: np.ndarray
    radius: float
    images: int
    recurrence: float
    other_rate: float
    attention_lift: float

    @property
    def score(self) -> float:
        return self.recurrence * (1.0 - self.other_rate)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :], 0.0)


def _greedy_clusters(x: np.ndarray, image: np.ndarray, eps: float, min_images: int,
                     max_clusters: int) -> list[np.ndarray]:
    """Leader clustering without a preset k: repeatedly take the descriptor whose
    eps-neighbourhood spans the most distinct images, make that neighbourhood a cluster and
    remove it. Returns boolean member masks over ``x``, largest first."""
    near = np.sqrt(_sq_dist(x, x)) <= eps  # (M, M)
    ids, image_col = np.unique(image, return_inverse=True)
    onehot = np.zeros((len(x), len(ids)), bool)
    onehot[np.arange(len(x)), image_col] = True
    free = np.ones(len(x), bool)
    clusters: list[np.ndarray] = []
    while len(clusters) < max_clusters and free.any():
        reach = near & free[None, :]
        spans = ((reach.astype(np.int64) @ onehot.astype(np.int64)) > 0).sum(1)
        spans[~free] = -1
        best = int(spans.argmax())
        if spans[best] < min_images:
            break
        members = reach[best]
        clusters.append(members)
        free &= ~members
    return clusters


def _flatten(descriptors: Sequence[np.ndarray], patches: Sequence[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All keypoints of all images: descriptors (M, D), image index (M,), patch (M,)."""
    dim = next((d.shape[1] for d in descriptors if d.ndim == 2 and len(d)), 128)
    desc = np.concatenate([np.asarray(d, np.float64).reshape(-1, dim) for d in descriptors])
    img = np.repeat(np.arange(len(descriptors)), [len(d) for d in descriptors])
    patch = np.concatenate([np.asarray(p, np.int64) for p in patches]) if len(patches) else (
        np.zeros(0, np.int64))
    return desc, img, patch


def discover_candidates(descriptors: Sequence[np.ndarray], keypoint_patches: Sequence[np.ndarray],
                        attention: np.ndarray, predicted: np.ndarray, *,
                        top_fraction: float = 0.1, eps_factor: float = 0.3,
                        max_clusters_per_class: int = 8, min_recurrence: float = 0.3,
                        max_other_rate: float = 0.2) -> list[Candidate]:
    """Candidate shortcuts, best first.

    ``descriptors[i]`` (K_i, 128) and ``keypoint_patches[i]`` (K_i,) are image i's SIFT
    descriptors and their patch index; ``attention`` (B, N) an attribution map per image;
    ``predicted`` (B,) the model's classes. Two descriptors match when their distance is
    at most ``eps_factor`` times the median distance between descriptors of the data set,
    so near-copies of one pattern group together and unrelated texture does not."""
    b, n = attention.shape
    desc, img, patch = _flatten(descriptors, keypoint_patches)
    if len(desc) < 2:
        return []
    rng = np.random.default_rng(0)
    sample = desc[rng.choice(len(desc), size=min(len(desc), 512), replace=False)]
    eps = eps_factor * float(np.median(np.sqrt(_sq_dist(sample, sample))))
    top_k = max(1, int(np.ceil(top_fraction * n)))
    top = np.zeros((b, n), bool)
    np.put_along_axis(top, np.argsort(-attention, 1)[:, :top_k], True, 1)
    in_top = top[img, patch]
    out: list[Candidate] = []
    for cls in np.unique(predicted):
        members = (predicted[img] == cls) & in_top
        n_cls = int((predicted == cls).sum())
        others = predicted != cls
        if members.sum() < 2 or n_cls < 2:
            continue
        x, x_img, x_patch = desc[members], img[members], patch[members]
        min_images = max(2, int(np.ceil(min_recurrence * n_cls)))
        for mine in _greedy_clusters(x, x_img, eps, min_images, max_clusters_per_class):
            centroid = x[mine].mean(0)
            radius = max(eps, float(np.sqrt(((x[mine] - centroid) ** 2).sum(1)).max()))
            hit_imgs = np.unique(x_img[mine])
            near_other = np.zeros(b, bool)
            near_other[img[np.sqrt(_sq_dist(desc, centroid[None]))[:, 0] <= radius]] = True
            other_rate = float(near_other[others].mean()) if others.any() else 0.0
            lift = float(attention[x_img[mine], x_patch[mine]].mean() * n)
            recurrence = len(hit_imgs) / n_cls
            if recurrence >= min_recurrence and other_rate <= max_other_rate:
                out.append(Candidate(int(cls), centroid, radius, len(hit_imgs), recurrence,
                                     other_rate, lift))
    return sorted(out, key=lambda c: -c.score)


def candidate_patches(candidate: Candidate, descriptors: Sequence[np.ndarray],
                      keypoint_patches: Sequence[np.ndarray], num_patches: int) -> np.ndarray:
    """(B, N) bool: the patches holding a keypoint that matches ``candidate``."""
    desc, img, patch = _flatten(descriptors, keypoint_patches)
    mask = np.zeros((len(descriptors), num_patches), bool)
    if len(desc):
        near = np.sqrt(_sq_dist(desc, candidate.centroid[None]))[:, 0] <= candidate.radius
        mask[img[near], patch[near]] = True
    return mask
