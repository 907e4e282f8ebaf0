"""Patch maskers for masked-image pre-training (METHOD.md §4), vectorised on the device.

Every masker maps semantic weights w (B, N) (keypoint concentration per patch, rows summing
to 1 or all zero) to a boolean mask (B, N) with exactly ``round(ratio * N)`` patches masked
in every image, drawn with a ``torch.Generator`` so a run is reproducible and resumable.
Sampling without replacement with probabilities proportional to scores s_i uses the
Gumbel-top-k trick: the k largest log(s_i) + Gumbel noise are a successive (Plackett-Luce)
draw of k patches, the same law as drawing one at a time in proportion to s_i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitsem.errors import ConfigError, PretrainInputError


@dataclass(frozen=True)
class MaskSpec:
    """``ratio``: share of patches masked, in (0, 1); ``alpha``: exponent of the ``sift``
    masker (> 0 masks semantic patches preferentially, < 0 keeps them visible); ``eps``:
    added to w so patches without keypoints keep a chance; ``hint_ratio``: share of the
    masked patches that ``sift-hint`` reveals among the most semantic ones; ``kamim``:
    strength of the keypoint loss weighting."""

    ratio: float = 0.75
    alpha: float = 1.0
    eps: float = 0.01
    hint_ratio: float = 0.1
    kamim: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"mask ratio must be in (0, 1), got {self.ratio}; "
                                     "MAE's default is 0.75")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if not 0.0 <= self.hint_ratio < 1.0:
            raise ConfigError(f"hint_ratio must be in [0, 1), got {self.hint_ratio}")

    def num_masked(self, n: int) -> int:
        k = round(self.ratio * n)
        if not 0 < k < n:
            raise PretrainInputError(f"mask ratio {self.ratio} of {n} patches masks {k}: "
                                     "every image needs at least one masked and one visible "
                                     "patch")
        return k


def _gumbel(shape: torch.Size, generator: torch.Generator, device: torch.device
            ) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def _top_k_mask(keys: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(keys, dtype=torch.bool)
    return mask.scatter_(1, keys.topk(k, dim=1).indices, True)


def _uniform_among(allowed: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: k patches per row drawn uniformly among ``allowed`` ones (each row must
    allow at least k)."""
    noise = _gumbel(allowed.shape, generator, allowed.device)
    return _top_k_mask(torch.where(allowed, noise, torch.full_like(noise, -torch.inf)), k)


def sample_proportional(scores: torch.Tensor, k: int, generator: torch.Generator
                        ) -> torch.Tensor:
    """(B, N) bool: k patches per row drawn without replacement, each next draw in
    proportion to ``scores`` (> 0) among the patches not yet drawn."""
    keys = scores.log() + _gumbel(scores.shape, generator, scores.device)
    return _top_k_mask(keys, k)


def random_mask(w: torch.Tensor, spec: MaskSpec, generator: torch.Generator) -> torch.Tensor:
    """MAE's uniform random masking (the baseline)."""
    return sample_proportional(torch.ones_like(w), spec.num_masked(w.shape[1]), generator)


def sift_mask(w: torch.Tensor, spec: MaskSpec, generator: torch.Generator) -> torch.Tensor:
    """Mask patch i with probability proportional to (w_i + eps)^alpha."""
    scores = (w + spec.eps).pow(spec.alpha)
    return sample_proportional(scores, spec.num_masked(w.shape[1]), generator)


def sift_hint_mask(w: torch.Tensor, spec: MaskSpec, generator: torch.Generator
                   ) -> torch.Tensor:
    """``sift`` masking, then a random ``hint_ratio`` share of the masked patches, taken
    among the most semantic masked ones (the top half by w), is revealed as a hint
    (AttMask); as many other visible patches are masked instead, so the ratio stays exact."""
    n = w.shape[1]
    k = spec.num_masked(n)
    mask = sift_mask(w, spec, generator)
    hints = min(round(spec.hint_ratio * k), n - k)
    if hints == 0:
        return mask
    # Candidates for hints: the ceil(k / 2) most semantic masked patches of each row.
    sem = torch.where(mask, w, torch.full_like(w, -1.0))
    top = _top_k_mask(sem + 1e-6 * _gumbel(w.shape, generator, w.device), max(hints, -(-k // 2)))
    reveal = _uniform_among(top, hints, generator)
    # Replace them by as many currently visible patches, drawn uniformly.
    extra = _uniform_among(~mask, hints, generator)
    return (mask & ~reveal) | extra


def attmask_mask(attention: torch.Tensor, spec: MaskSpec, generator: torch.Generator
                 ) -> torch.Tensor:
    """AttMask (Kakogeorgiou et al. 2022) for MAE: mask the ``round(ratio * N)`` patches
    that the encoder's own CLS attention (B, N) ranks highest; equal attention is ordered
    by a random permutation from ``generator`` (deterministic given its state). With
    ``hint_ratio`` > 0 (AttMask-Hint), that share of the masked patches, drawn uniformly
    among the most attended ones, is revealed and as many of the next most attended visible
    patches are masked instead, so the ratio stays exact; ``hint_ratio=0`` is AttMask-High.
    The loop passes the attention in place of the keypoint weights (see
    :data:`NEEDS_ATTENTION`)."""
    b, n = attention.shape
    k = spec.num_masked(n)
    # A random order per row, then a stable sort by attention: ties follow that order.
    perm = torch.rand((b, n), generator=generator, device=generator.device
                      ).to(attention.device).argsort(1)
    ranked = torch.sort(attention.gather(1, perm), dim=1, descending=True, stable=True)
    order = perm.gather(1, ranked.indices)  # patch indices, most attended first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device)
                                            .expand(b, n).contiguous())
    mask = rank < k
    hints = min(round(spec.hint_ratio * k), n - k)
    if hints == 0:
        return mask
    reveal = _uniform_among(mask, hints, generator)
    extra = (rank >= k) & (rank < k + hints)  # the next most attended visible patches
    return (mask & ~reveal) | extra


Masker = Callable[[torch.Tensor, MaskSpec, torch.Generator], torch.Tensor]

MASKERS: dict[str, Masker] = {
    "random": random_mask,
    "sift": sift_mask,
    "sift-hint": sift_hint_mask,
    "kamim": random_mask,  # random masking; the keypoint weighting is in the loss
    "attmask": attmask_mask,
}
"""Registry of maskers by name; ``kamim`` masks at random and weights the loss."""

NEEDS_ATTENTION = frozenset({"attmask"})
"""Maskers that rank patches by the encoder's CLS attention instead of keypoint weights:
the loop computes it for each batch (:meth:`MaskedAutoencoder.cls_attention`) and passes
it as the masker's first argument."""


def loss_weights(masker: str, w: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """(B, N) per-patch reconstruction-loss weights: 1 everywhere, except for ``kamim``
    (KAMIM-style): 1 + kamim * w_i / max_j w_j, so keypoint-dense patches count more."""
    if masker != "kamim":
        return torch.ones_like(w)
    peak = w.amax(1, keepdim=True).clamp_min(1e-12)
    return 1.0 + spec.kamim * w / peak


def make_mask(masker: str, w: torch.Tensor, spec: MaskSpec, generator: torch.Generator
              ) -> torch.Tensor:
    try:
        fn = MASKERS[masker]
    except KeyError:
        raise ConfigError(f"unknown masker {masker!r}; choose one of {sorted(MASKERS)}") from None
    return fn(w, spec, generator)
