"""Literal references the optimised paths are tested against (test code, not production)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def predict_removed_reference(model: nn.Module, x: torch.Tensor, drop: torch.Tensor
                              ) -> torch.Tensor:
    """Logits (B, C) with the patches where ``drop`` (B, N) is True removed by literally
    shortening each image's token sequence, one image at a time."""
    vit: Any = model
    p = int(getattr(vit, "num_prefix_tokens", 1))
    out = []
    for i in range(len(x)):
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x[i:i + 1]))))
        kept = p + (~drop[i].to(torch.bool)).nonzero().squeeze(1)
        keep = torch.cat([torch.arange(p), kept.cpu()]).to(tokens.device)
        out.append(vit.forward_head(vit.norm(vit.blocks(tokens[:, keep]))))
    return torch.cat(out)
