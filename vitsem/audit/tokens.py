"""Inference with patch tokens removed ("prompting"): ViTs accept fewer tokens.

For CLS-pooled models, removal is done with an attention mask in which no token may attend
to a removed patch: the CLS output is then exactly that of the shorter sequence, and the
batch stays one tensor however many patches each image drops. Models that pool over patch
tokens gather the kept tokens instead (grouped by how many each image keeps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitsem.errors import UnsupportedModelError
from vitsem.method.attention import num_prefix_tokens


def _uses_cls_pool(model: nn.Module) -> bool:
    return getattr(model, "global_pool", "token") == "token" and getattr(
        model, "cls_token", None) is not None


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre"):
        if not hasattr(model, name):
            raise UnsupportedModelError(
                f"{type(model).__name__} lacks {name}; token removal needs a timm "
                "VisionTransformer")
    vit: Any = model
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def predict_without(model: nn.Module, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) of ``model`` on ``x`` (B, 3, H, W) with the patches where ``drop``
    (B, N) is True removed from the token sequence. Prefix tokens always stay."""
    p = num_prefix_tokens(model)
    drop = drop.to(device=x.device, dtype=torch.bool)
    if not bool(drop.any()):
        return model(x)
    if bool(drop.all(1).any()):
        raise ValueError("an image would keep no patch token; drop fewer patches")
    if _uses_cls_pool(model):
        b, n = drop.shape
        keys = torch.cat([torch.ones(b, p, dtype=torch.bool, device=x.device), ~drop], 1)
        # (B, 1, T, T): row i may attend to key j when j is kept.
        mask = keys[:, None, None, :].expand(b, 1, n + p, n + p)
        return model(x, attn_mask=mask)
    return _predict_gathered(model, x, drop)


def _predict_gathered(model: nn.Module, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    p = num_prefix_tokens(model)
    tokens = _embed(model, x)
    keep_counts = (~drop).sum(1)
    out = torch.empty(0)
    for count in keep_counts.unique().tolist():
        rows = (keep_counts == count).nonzero().squeeze(1)
        # Stable sort puts kept patches first, in their original order.
        order = torch.sort(drop[rows].int(), dim=1, stable=True).indices[:, :count]
        patches = torch.gather(tokens[rows, p:], 1,
                               order[..., None].expand(-1, -1, tokens.shape[-1]))
        seq = torch.cat([tokens[rows, :p], patches], 1)
        vit: Any = model
        logits = vit.forward_head(vit.norm(vit.blocks(seq)))
        if out.numel() == 0:
            out = logits.new_empty(len(x), logits.shape[-1])
        out[rows] = logits
    return out


def predict_leave_one_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, N, C): row [i, j] is the model on image i with patch j alone removed.
    The tokens are embedded once per image; the N shortened sequences (N - 1 patches each,
    in their original order, prefix tokens kept) go through the blocks as one batch."""
    p = num_prefix_tokens(model)
    tokens = _embed(model, x)
    b, t, d = tokens.shape
    n = t - p
    # (N, N - 1): for removed patch j, the indices of the patches that stay.
    keep = torch.arange(n, device=x.device).expand(n, n)
    keep = keep[~torch.eye(n, dtype=torch.bool, device=x.device)].view(n, n - 1)
    patches = tokens[:, p:][:, keep]  # (B, N, N - 1, D)
    prefix = tokens[:, None, :p].expand(b, n, p, d)
    seq = torch.cat([prefix, patches], 2).reshape(b * n, t - 1, d)
    vit: Any = model
    logits = vit.forward_head(vit.norm(vit.blocks(seq)))
    return logits.view(b, n, -1)

