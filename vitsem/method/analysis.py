"""Weighted patch interrelation analysis (METHOD.md §2), vectorised over images and heads.

Notation: A (B, H, T, T) is one block's softmax attention, p the number of prefix tokens,
P = A[..., p:, p:] (B, H, N, N) the patch-to-patch block and A_pp = P / P.sum(-1) its
row-renormalised form. Statistics that are undefined for an image (no keypoint, an empty
level, no CLS token) are NaN, never a division by zero; the streaming accumulators skip NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from vitsem.method.attention import AttentionBlock, TokenLayout, capture_attention, num_layers_heads
from vitsem.method.concentration import concentration_levels, patch_weights

PER_HEAD_STATS: dict[str, str] = {
    "semantic_mass": "mean over queries of the A_pp mass on keypoint patches; shape ()",
    "semantic_lift": "semantic mass / share of keypoint patches (1 = uniform); shape ()",
    "cls_focus": "sum_j a_cls[j] w_j N of the CLS row (1 = no preference); shape ()",
    "level_matrix": "R[a, b]: mean over level-a queries of A_pp mass on level b; (K, K)",
    "distance": "mean attention distance in patch units, per query level; (K,)",
    "entropy": "mean row entropy of A_pp in nats, per query level; (K,)",
}
"""Statistics computed per (image, layer, head), with their meaning and trailing shape."""


@dataclass(frozen=True)
class SemanticBatch:
    """Per-image semantic inputs for one batch, as tensors on the analysis device.

    ``semantic`` (B, N) float 0/1 for c > 0, ``weights`` (B, N) w = c / sum(c),
    ``onehot`` (B, N, K) level membership.
    """

    semantic: torch.Tensor
    weights: torch.Tensor
    onehot: torch.Tensor

    @cached_property
    def onehot_and_ones(self) -> torch.Tensor:
        """(B, N, K + 1): level membership plus a column of ones, so one matmul gives the
        per-level masses and the row sums. Built once per batch, used by every block."""
        ones = torch.ones_like(self.onehot[..., :1])
        return torch.cat([self.onehot, ones], -1)

    @classmethod
    def from_concentrations(cls, c: np.ndarray, num_levels: int = 3,
                            thresholds: np.ndarray | None = None,
                            device: torch.device | str = "cpu") -> SemanticBatch:
        """``c`` (B, N) concentrations -> tensors; levels by :func:`concentration_levels`."""
        levels = np.stack([concentration_levels(ci, num_levels, thresholds) for ci in c])
        onehot = np.eye(num_levels, dtype=np.float32)[levels]
        return cls(
            semantic=torch.from_numpy((c > 0).astype(np.float32)).to(device),
            weights=torch.from_numpy(patch_weights(c).astype(np.float32)).to(device),
            onehot=torch.from_numpy(onehot).to(device),
        )

    @property
    def num_levels(self) -> int:
        return int(self.onehot.shape[-1])

    def uniform_level_matrix(self) -> torch.Tensor:
        """(B, K, K) level matrix under uniform attention: every row is the level shares."""
        share = self.onehot.mean(1)  # (B, K)
        return share[:, None, :].expand(-1, self.num_levels, -1).clone()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, torch.nan))


def interrelation_stats(block: AttentionBlock, sem: SemanticBatch, layout: TokenLayout,
                        distances: torch.Tensor, scratch: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
    """All :data:`PER_HEAD_STATS` for one block. ``distances`` (N, N) patch distances,
    ``scratch`` an optional reusable (B, H, N, N) float32 buffer. Returns tensors of shape
    (B, H, ...)."""
    attn = block.probs
    p = layout.num_prefix
    n = layout.grid.num_patches
    if attn.shape[-1] != p + n:
        raise ValueError(
            f"attention has {attn.shape[-1]} tokens, layout expects {p} prefix + {n} patches"
        )
    pp = attn[..., p:, p:]
    onehot = sem.onehot
    k = onehot.shape[-1]
    # One batched matmul gives each query's mass on every level and its row sum r.
    sums = pp @ sem.onehot_and_ones[:, None]  # (B, H, N, K + 1)
    row = sums[..., k]  # (B, H, N); > 0: softmax is positive
    inv_row = row.reciprocal()
    level_mass = sums[..., :k] * inv_row[..., None]  # (B, H, N, K)
    counts = onehot.sum(1)  # (B, K)
    n_sem = sem.semantic.sum(1)  # (B,)

    mass = level_mass[..., 1:].sum(-1).mean(-1)  # (B, H)
    lift = _safe_div(mass, (n_sem / n)[:, None].expand_as(mass))
    lift = torch.where((n_sem > 0)[:, None], lift, torch.full_like(lift, torch.nan))

    level_sum = torch.einsum("bnk,bhnl->bhkl", onehot, level_mass)
    level_matrix = _safe_div(level_sum, counts[:, None, :, None].expand_as(level_sum))

    def per_level(per_query: torch.Tensor) -> torch.Tensor:  # (B, H, N) -> (B, H, K)
        tot = torch.einsum("bnk,bhn->bhk", onehot, per_query)
        return _safe_div(tot, counts[:, None, :].expand_as(tot))

    # Both row reductions below go through ``scratch``: a fresh (B, H, N, N) temporary per
    # block costs more in page faults than the arithmetic.
    if scratch is None or scratch.shape != pp.shape:
        scratch = torch.empty_like(pp)
    dist = torch.mul(pp, distances, out=scratch).sum(-1) * inv_row
    # Row entropy of A_pp = P / r with log P = logits - log Z (no logarithm of the map):
    # H = log Z + log r - sum_j P logits / r.
    plogit = torch.mul(pp, block.logits[..., p:, p:], out=scratch)
    if block.masked:  # 0 * -inf where a key is masked out: it contributes nothing
        plogit.nan_to_num_(nan=0.0)
    ent = block.log_partition[..., p:, 0] + row.log() - plogit.sum(-1) * inv_row

    if layout.has_cls:
        a_cls = attn[..., 0, p:]
        a_cls = a_cls / a_cls.sum(-1, keepdim=True)
        focus = (a_cls * sem.weights[:, None, :]).sum(-1) * n
        focus = torch.where((n_sem > 0)[:, None], focus, torch.full_like(focus, torch.nan))
    else:
        focus = torch.full_like(mass, torch.nan)

    return {
        "semantic_mass": mass,
        "semantic_lift": lift,
        "cls_focus": focus,
        "level_matrix": level_matrix,
        "distance": per_level(dist),
        "entropy": per_level(ent),
    }


@dataclass
class BatchAnalysis:
    """One batch's output: ``logits`` (B, C); ``stats`` name -> (B, L, H, ...) float32 arrays;
    ``cls_maps`` (B, L, H, N) CLS attention over patches (renormalised) when asked for."""

    logits: torch.Tensor
    stats: dict[str, np.ndarray]
    uniform_level_matrix: np.ndarray
    cls_maps: np.ndarray | None = None


class InterrelationAnalyzer:
    """Runs a model with attention capture and reduces every block's map to
    :data:`PER_HEAD_STATS` as it is produced, so no full map outlives its block."""

    def __init__(self, model: nn.Module, layout: TokenLayout) -> None:
        self.model = model
        self.layout = layout
        self.num_layers, self.num_heads = num_layers_heads(model)
        self._distances: dict[torch.device, torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None

    def distances(self, device: torch.device) -> torch.Tensor:
        if device not in self._distances:
            d = torch.from_numpy(self.layout.grid.distances().astype(np.float32))
            self._distances[device] = d.to(device)
        return self._distances[device]

    @torch.inference_mode()
    def run(self, x: torch.Tensor, sem: SemanticBatch, keep_cls_maps: bool = False
            ) -> BatchAnalysis:
        """Forward ``x`` (B, 3, H, W) and analyse every block against ``sem``."""
        per_layer: list[dict[str, torch.Tensor]] = []
        cls_rows: list[torch.Tensor] = []
        dist = self.distances(x.device)

        def sink(_layer: int, block: AttentionBlock) -> None:
            attn = block.probs
            p = self.layout.num_prefix
            shape = attn[..., p:, p:].shape
            if self._scratch is None or self._scratch.shape != shape:
                self._scratch = torch.empty(shape, dtype=attn.dtype, device=attn.device)
            per_layer.append(interrelation_stats(block, sem, self.layout, dist, self._scratch))
            if keep_cls_maps and self.layout.has_cls:
                row = attn[..., 0, p:]
                cls_rows.append(row / row.sum(-1, keepdim=True))

        with capture_attention(self.model, sink):
            logits = self.model(x)
        stats = {k: torch.stack([d[k] for d in per_layer], 1).cpu().numpy()
                 for k in PER_HEAD_STATS}
        cls_maps = torch.stack(cls_rows, 1).cpu().numpy() if cls_rows else None
        return BatchAnalysis(logits, stats, sem.uniform_level_matrix().cpu().numpy(), cls_maps)
