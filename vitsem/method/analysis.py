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

from vitsem.method.attention import (
    AttentionBlock,
    TokenLayout,
    Workspace,
    capture_attention,
    num_layers_heads,
)
from vitsem.method.concentration import concentration_levels, patch_weights
from vitsem.method.row_stats import row_reductions, use_fused

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
                        distances: torch.Tensor, workspace: Workspace | None = None
                        ) -> dict[str, torch.Tensor]:
    """All :data:`PER_HEAD_STATS` for one block. ``distances`` (N, N) patch distances,
    ``workspace`` optional reusable buffers. Returns tensors of shape (B, H, ...).

    The map is read over chunks of query rows that fit the block's memory budget, and only
    its patch-to-patch part and CLS row: A_pp = E / r with E = exp(s - max s) of the raw
    patch scores s and r its row sum, so the softmax over all tokens is never normalised.
    Per query it keeps the level masses, the distance and the entropy (B, H, N, ...), from
    :func:`~vitsem.method.row_stats.row_reductions` (one fused pass when compiled)."""
    p = layout.num_prefix
    n = layout.grid.num_patches
    b, h, t, _ = block.shape
    if t != p + n:
        raise ValueError(
            f"attention has {t} tokens, layout expects {p} prefix + {n} patches"
        )
    ws = workspace or Workspace()
    onehot = sem.onehot
    k = onehot.shape[-1]
    levels_ones = sem.onehot_and_ones  # (B, N, K + 1)
    level_mass = torch.empty(b, h, n, k, device=block.device)
    dist = torch.empty(b, h, n, device=block.device)
    ent = torch.empty(b, h, n, device=block.device)
    fused = use_fused(block.shape, block.device.type)
    # The fused kernel keeps no (B, H, R, N) temporary besides the scores; the eager path
    # keeps three. Fewer, larger chunks measured faster: the matmul then runs at full size.
    step = block.chunk_rows(buffers=1 if fused else 3, keys=n)
    for a in range(0, n, step):
        z = min(a + step, n)
        scores = block.scores(slice(p + a, p + z), slice(p, None), out="stats_scores")
        scratch = None if fused else (ws.get("stats_exp", scores.shape, block.device),
                                      ws.get("stats_prod", scores.shape, block.device))
        level_mass[:, :, a:z], dist[:, :, a:z], ent[:, :, a:z] = row_reductions(
            scores, levels_ones, distances[a:z], block.masked, scratch, fused)

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

    if layout.has_cls:
        a_cls = cls_patch_attention(block, layout)
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


def cls_patch_attention(block: AttentionBlock, layout: TokenLayout) -> torch.Tensor:
    """(B, H, N) the CLS row's attention over the patches, renormalised to sum to 1; reads
    only that row of the map."""
    row = block.scores(slice(0, 1), slice(layout.num_prefix, None), out="cls_row")[:, :, 0]
    return row.softmax(-1)


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
    :data:`PER_HEAD_STATS` as it is produced, chunk by chunk of query rows within
    ``memory_budget`` bytes (default :data:`~vitsem.method.attention.DEFAULT_MEMORY_BUDGET`),
    so no block's full (B, H, T, T) map is ever held."""

    def __init__(self, model: nn.Module, layout: TokenLayout,
                 memory_budget: int | None = None) -> None:
        self.model = model
        self.layout = layout
        self.memory_budget = memory_budget
        self.num_layers, self.num_heads = num_layers_heads(model)
        self._distances: dict[torch.device, torch.Tensor] = {}
        self._ws = Workspace()

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
            per_layer.append(interrelation_stats(block, sem, self.layout, dist, self._ws))
            if keep_cls_maps and self.layout.has_cls:
                cls_rows.append(cls_patch_attention(block, self.layout))

        with capture_attention(self.model, sink, self.memory_budget):
            logits = self.model(x)
        stats = {k: torch.stack([d[k] for d in per_layer], 1).cpu().numpy()
                 for k in PER_HEAD_STATS}
        cls_maps = torch.stack(cls_rows, 1).cpu().numpy() if cls_rows else None
        return BatchAnalysis(logits, stats, sem.uniform_level_matrix().cpu().numpy(), cls_maps)
