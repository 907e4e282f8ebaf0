"""Recurring-pattern discovery without annotations (METHOD.md §3).

The SIFT descriptors of keypoints in each image's most-attended patches are clustered per
predicted class; a cluster is a *candidate shortcut* when it recurs across many images of
one class and is markedly rarer in the other classes. Clusters that mark the same patches
(several keypoints of one glyph) are merged into one candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse


@dataclass(frozen=True)
class Candidate:
    """A recurring descriptor pattern of predicted class ``cls``.

    ``centroids`` (K, 128) and ``radii`` (K,): a keypoint matches when it lies within the
    radius of any centroid. ``recurrence``: share of the class's images with a match in a
    top-attended patch; ``other_rate``: share of other classes' images with a match anywhere;
    ``attention_lift``: mean attention on its patches over uniform (1 / N); ``patches``
    (B, N): the patches holding a match."""

    cls: int
    centroids: np.ndarray
    radii: np.ndarray
    images: int
    recurrence: float
    other_rate: float
    attention_lift: float
    patches: np.ndarray = field(repr=False, compare=False)

    @property
    def score(self) -> float:
        """Class specificity: recurrence in the class minus the rate elsewhere."""
        return self.recurrence - self.other_rate


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :], 0.0)


def _neighbours(x: np.ndarray, eps: float, chunk: int = 2048) -> sparse.csr_matrix:
    """(M, M) sparse 0/1 matrix of descriptor pairs within ``eps``, built in row chunks so
    memory follows the number of close pairs, not M^2."""
    sq = (x**2).sum(1)
    parts = []
    for i in range(0, len(x), chunk):
        d2 = sq[i:i + chunk, None] - 2 * x[i:i + chunk] @ x.T + sq[None, :]
        parts.append(sparse.csr_matrix(d2 <= eps * eps, dtype=np.float32))
    return sparse.vstack(parts, format="csr")


def _greedy_clusters(x: np.ndarray, image: np.ndarray, eps: float, min_images: int,
                     max_clusters: int) -> list[np.ndarray]:
    """Leader clustering without a preset k: repeatedly take the descriptor whose
    eps-neighbourhood spans the most distinct images, make that neighbourhood a cluster and
    remove it. Returns boolean member masks over ``x``, largest first."""
    near = _neighbours(x, eps)
    _ids, image_col = np.unique(image, return_inverse=True)
    onehot = sparse.csr_matrix((np.ones(len(x), np.float32), (np.arange(len(x)), image_col)))
    free = np.ones(len(x), bool)
    clusters: list[np.ndarray] = []
    while len(clusters) < max_clusters and free.any():
        # (M, images) counts of free neighbours per image; non-zeros = distinct images.
        reach = near @ sparse.diags(free.astype(np.float32)) @ onehot
        spans = np.diff(reach.tocsr().indptr) if reach.nnz else np.zeros(len(x), np.int64)
        spans = np.where(free, spans, -1)
        best = int(spans.argmax())
        if spans[best] < min_images:
            break
        members = (near[best].toarray()[0] > 0) & free
        clusters.append(members)
        free &= ~members
    return clusters


def _flatten(descriptors: Sequence[np.ndarray], patches: Sequence[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All keypoints of all images: descriptors (M, D), image index (M,), patch (M,)."""
    dim = next((d.shape[1] for d in descriptors if d.ndim == 2 and len(d)), 128)
    desc = np.concatenate([np.asarray(d, np.float32).reshape(-1, dim) for d in descriptors])
    img = np.repeat(np.arange(len(descriptors)), [len(d) for d in descriptors])
    patch = np.concatenate([np.asarray(p, np.int64) for p in patches]) if len(patches) else (
        np.zeros(0, np.int64))
    return desc, img, patch


def dilate(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(B, N) patch masks grown by one patch in all 8 directions on the (gh, gw) grid."""
    gh, gw = grid_hw
    m = np.pad(mask.reshape(-1, gh, gw), ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((len(mask), gh, gw), bool)
    for dy in range(3):
        for dx in range(3):
            out |= m[:, dy:dy + gh, dx:dx + gw]
    return out.reshape(mask.shape)


def _same_pattern(a: np.ndarray, b: np.ndarray, grid_hw: tuple[int, int],
                  overlap: float) -> bool:
    """Two clusters' (B, N) masks mark one pattern when they occur in mostly the same images
    (Jaccard >= ``overlap``) and, where both occur, touch or share patches in most images:
    several keypoints of one glyph."""
    ia, ib = a.any(1), b.any(1)
    union = (ia | ib).sum()
    both = ia & ib
    if not union or both.sum() / union < overlap:
        return False
    touching = (dilate(a[both], grid_hw) & b[both]).any(1)
    return bool(touching.mean() >= 0.5)


def _match_mask(desc: np.ndarray, img: np.ndarray, patch: np.ndarray, centroids: np.ndarray,
                radii: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    if len(desc):
        near = (_sq_dist(desc, centroids) <= radii[None, :] ** 2).any(1)
        mask[img[near], patch[near]] = True
    return mask


def discover_candidates(descriptors: Sequence[np.ndarray], keypoint_patches: Sequence[np.ndarray],
                        attention: np.ndarray, predicted: np.ndarray, *,
                        top_fraction: float = 0.1, eps_factor: float = 0.3,
                        max_clusters_per_class: int = 32, min_recurrence: float = 0.3,
                        min_enrichment: float = 1.5, merge_overlap: float = 0.5,
                        grid_hw: tuple[int, int] | None = None) -> list[Candidate]:
    """Candidate shortcuts, best (most class-specific) first.

    ``descriptors[i]`` (K_i, 128) and ``keypoint_patches[i]`` (K_i,) are image i's SIFT
    descriptors and their patch index; ``attention`` (B, N) an attribution map per image;
    ``predicted`` (B,) the model's classes. Two descriptors match when their distance is
    at most ``eps_factor`` times the median distance between descriptors of the data set,
    so near-copies of one pattern group together and unrelated texture does not. A cluster
    is kept when it recurs in at least ``min_recurrence`` of its class's images and at
    least ``min_enrichment`` times as often as in other classes' images (on decorrelated
    data a shortcut also sits in images the model got right, so it is rarer there, not
    absent). Clusters that occur in the same images (Jaccard >= ``merge_overlap``) on
    touching patches of the ``grid_hw`` grid (default: square) merge into one candidate."""
    b, n = attention.shape
    if grid_hw is None:
        side = round(float(np.sqrt(n)))
        grid_hw = (side, n // side)
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
        mine = predicted == cls
        members = mine[img] & in_top
        n_cls = int(mine.sum())
        if members.sum() < 2 or n_cls < 2:
            continue
        x, x_img = desc[members], img[members]
        min_images = max(2, int(np.ceil(min_recurrence * n_cls)))
        groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # centroids, radii, mask
        for member in _greedy_clusters(x, x_img, eps, min_images, max_clusters_per_class):
            centroid = x[member].mean(0, keepdims=True)
            radius = np.array([max(eps, float(np.sqrt(_sq_dist(x[member], centroid)).max()))])
            mask = _match_mask(desc, img, patch, centroid, radius, (b, n))
            for g, (cs, rs, gm) in enumerate(groups):
                if _same_pattern(mask, gm, grid_hw, merge_overlap):
                    groups[g] = (np.vstack([cs, centroid]), np.append(rs, radius), gm | mask)
                    break
            else:
                groups.append((centroid, radius, mask))
        others = ~mine
        for cs, rs, mask in groups:
            hit = (mask & top)[mine].any(1)
            recurrence = float(hit.mean())
            other_rate = float(mask[others].any(1).mean()) if others.any() else 0.0
            marked = mask & mine[:, None]
            lift = float(attention[marked].mean() * n) if marked.any() else 0.0
            if recurrence >= min_recurrence and recurrence >= min_enrichment * other_rate:
                out.append(Candidate(int(cls), cs, rs, int(hit.sum()), recurrence, other_rate,
                                     lift, mask))
    return sorted(out, key=lambda c: -c.score)


def match_patches(centroids: np.ndarray, radii: np.ndarray, descriptors: Sequence[np.ndarray],
                  keypoint_patches: Sequence[np.ndarray], num_patches: int) -> np.ndarray:
    """(B, N) bool: the patches holding a keypoint within ``radii`` (K,) of any of a
    pattern's ``centroids`` (K, 128), in images other than those it was found on."""
    desc, img, patch = _flatten(descriptors, keypoint_patches)
    return _match_mask(desc, img, patch, np.asarray(centroids, np.float32),
                       np.asarray(radii, np.float64), (len(descriptors), num_patches))


def _components(mask: np.ndarray, grid_hw: tuple[int, int]) -> list[np.ndarray]:
    """8-connected components of one (N,) bool mask on the (gh, gw) grid, as (N,) masks."""
    out: list[np.ndarray] = []
    left = mask.copy()
    while left.any():
        comp = np.zeros_like(left)
        comp[int(np.flatnonzero(left)[0])] = True
        while True:
            grown = dilate(comp[None], grid_hw)[0] & left
            if (grown == comp).all():
                break
            comp = grown
        out.append(comp)
        left &= ~comp
    return out


def recurring_positions(attention: np.ndarray, predicted: np.ndarray, *,
                        top_fraction: float = 0.1, min_recurrence: float = 0.3,
                        min_enrichment: float = 1.5, alpha: float = 0.01,
                        grid_hw: tuple[int, int] | None = None) -> list[Candidate]:
    """Candidates that need no keypoint: grid positions that are among an image's most
    attributed patches in many images of one predicted class and markedly more often than
    in the other classes' images (a pattern at a fixed place, such as a watermark or a
    corner stamp, whether or not SIFT fires on it).

    Per class, a position is *recurrent* when it is in the top ``top_fraction`` of the map
    in at least ``min_recurrence`` of the class's images, at least ``min_enrichment`` times
    as often as in other classes' images, and significantly so (one-sided Fisher exact test,
    p < ``alpha`` Bonferroni-corrected over every position and class tested, so chance
    peaks of a few images do not pass). Each 8-connected group of
    recurrent positions is one candidate; it marks, in every image where one of its
    positions is top-attributed, all of its positions. The candidate has no descriptors
    (``centroids`` (0, 128)): it is found again by its place, not by its look."""
    from scipy.stats import fisher_exact

    b, n = attention.shape
    if grid_hw is None:
        side = round(float(np.sqrt(n)))
        grid_hw = (side, n // side)
    top_k = max(1, int(np.ceil(top_fraction * n)))
    top = np.zeros((b, n), bool)
    np.put_along_axis(top, np.argsort(-attention, 1)[:, :top_k], True, 1)
    out: list[Candidate] = []
    classes = np.unique(predicted)
    level = alpha / (n * len(classes))
    for cls in classes:
        mine = predicted == cls
        others = ~mine
        if mine.sum() < 2 or not others.any():
            continue
        k_mine, k_other = top[mine].sum(0), top[others].sum(0)
        rate, other = k_mine / mine.sum(), k_other / others.sum()
        recurrent = (rate >= min_recurrence) & (rate >= min_enrichment * other)
        for j in np.flatnonzero(recurrent):
            table = [[int(k_mine[j]), int(mine.sum() - k_mine[j])],
                     [int(k_other[j]), int(others.sum() - k_other[j])]]
            if fisher_exact(table, alternative="greater")[1] >= level:
                recurrent[j] = False
        for comp in _components(recurrent, grid_hw):
            hit = (top & comp[None]).any(1)
            mask = hit[:, None] & comp[None]
            recurrence, other_rate = float(hit[mine].mean()), float(hit[others].mean())
            if recurrence < min_recurrence or recurrence < min_enrichment * other_rate:
                continue
            marked = mask & mine[:, None]
            out.append(Candidate(int(cls), np.zeros((0, 128), np.float32), np.zeros(0),
                                 int(hit[mine].sum()), recurrence, other_rate,
                                 float(attention[marked].mean() * n), mask))
    return sorted(out, key=lambda c: -c.score)
