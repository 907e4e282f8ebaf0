"""Attribution maps over patches, (B, N), each row summing to 1: the method's semantic
map and the baselines it is compared with (METHOD.md §3).

Every map takes ``(model, x, semantic)``: images (B, 3, H, W) and the patches' semantic
weights w (B, N) (keypoint concentration, rows summing to 1 or all zero). Only the
method's own map reads ``semantic``; the baselines ignore it, so one harness runs all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vitsem.audit.tokens import predict_leave_one_out
from vitsem.errors import UnsupportedModelError
from vitsem.method.attention import (
    AttentionBlock,
    attention_modules,
    capture_attention,
    num_prefix_tokens,
)


def _normalise(m: torch.Tensor) -> torch.Tensor:
    m = m.clamp_min(0)
    total = m.sum(-1, keepdim=True)
    return torch.where(total > 0, m / total.clamp_min(1e-30), torch.full_like(m, 1 / m.shape[-1]))


def _cls_row(block: AttentionBlock) -> torch.Tensor:
    """(B, H, T) the softmax attention of query 0 (CLS) over all tokens; reads only that
    row of the block's map."""
    return block.rows(0, 1).probs[:, :, 0].clone()


@torch.no_grad()
def semantic_attention(model: nn.Module, x: torch.Tensor, semantic: torch.Tensor
                       ) -> torch.Tensor:
    """The method's map: CLS attention over patches averaged over every block and head,
    weighted by the patch's semantic weight w_i. Images without keypoints keep the plain
    attention (there is no semantic evidence to weight by)."""
    p = num_prefix_tokens(model)
    acc: dict[str, torch.Tensor] = {}

    def sink(_layer: int, block: AttentionBlock) -> None:
        a = _cls_row(block)[..., p:].mean(1)
        acc["sum"] = a if "sum" not in acc else acc["sum"] + a

    with capture_attention(model, sink):
        model(x)
    attn = _normalise(acc["sum"])
    w = semantic.to(attn)
    weighted = attn * w
    has_keypoints = (w.sum(-1, keepdim=True) > 0)
    return torch.where(has_keypoints, _normalise(weighted), attn)


@torch.no_grad()
def cls_attention_last(model: nn.Module, x: torch.Tensor,
                       semantic: torch.Tensor | None = None) -> torch.Tensor:
    """The last block's CLS attention over patches, averaged over heads."""
    last = len(attention_modules(model)) - 1
    p = num_prefix_tokens(model)
    out: list[torch.Tensor] = []

    def sink(layer: int, block: AttentionBlock) -> None:
        if layer == last:
            out.append(_cls_row(block)[..., p:].mean(1))

    with capture_attention(model, sink):
        model(x)
    return _normalise(out[0])


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor,
                      semantic: torch.Tensor | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): the product over blocks of the head-mean
    attention mixed with the identity for the residual, (0.5 A + 0.5 I) row-normalised;
    the CLS row over patches."""
    p = num_prefix_tokens(model)
    state: dict[str, torch.Tensor] = {}

    def sink(_layer: int, block: AttentionBlock) -> None:
        # The head mean (B, T, T) chunk by chunk: the (B, H, T, T) map is never held whole.
        a = torch.empty(block.shape[0], block.shape[2], block.shape[3], device=block.device)
        for rows in block.chunks():
            torch.mean(rows.probs, 1, out=a[:, rows.start:rows.start + rows.probs.shape[2]])
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        state["r"] = a if "r" not in state else a @ state["r"]

    with capture_attention(model, sink):
        model(x)
    return _normalise(state["r"][:, 0, p:])


def gradcam_tokens(model: nn.Module, x: torch.Tensor, semantic: torch.Tensor | None = None,
                   target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM on the last block's output tokens: ReLU(sum_c w_c a_ic) with w_c the
    token-mean gradient of the target logit (default: the predicted class)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("Grad-CAM needs a model with .blocks")
    p = num_prefix_tokens(model)
    acts: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            cls = logits.argmax(-1) if target is None else target.to(logits.device)
            score = logits.gather(1, cls[:, None]).sum()
            grad = torch.autograd.grad(score, acts[0])[0]
    finally:
        handle.remove()
    act = acts[0].detach()[:, p:]
    weights = grad[:, p:].mean(1, keepdim=True)
    return _normalise(torch.relu((weights * act).sum(-1)))


def _target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return logits.argmax(-1) if target is None else target.to(logits.device)


def generic_attention(model: nn.Module, x: torch.Tensor, semantic: torch.Tensor | None = None,
                      target: torch.Tensor | None = None) -> torch.Tensor:
    """Generic Attention-model Explainability (Chefer, Gur & Wolf, ICCV 2021), the
    gradient-weighted rollout for self-attention: R = I (B, T, T); per block in depth order
    R += mean_h[(dA * A)^+] @ R, where dA is the gradient of the target logit (default: the
    predicted class) with respect to that block's softmax attention A (B, H, T, T). The CLS
    row of R over patches.

    The attention must be part of the graph, so the blocks run timm's explicit (unfused)
    path for this call; the fused setting is restored afterwards."""
    mods: list[Any] = attention_modules(model)
    if not all(hasattr(m, "attn_drop") and hasattr(m, "fused_attn") for m in mods):
        raise UnsupportedModelError(
            f"{type(model).__name__}: attention modules without attn_drop/fused_attn; the "
            "gradient-weighted rollout needs timm's Attention")
    p = num_prefix_tokens(model)
    attns: list[torch.Tensor] = []
    # attn_drop sees the softmax attention of the explicit path: the tensor to differentiate.
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: attns.append(out))
               for m in mods]
    fused = [bool(m.fused_attn) for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            score = logits.gather(1, _target(logits, target)[:, None]).sum()
            grads = torch.autograd.grad(score, attns)
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(mods, fused, strict=True):
            m.fused_attn = f
    b, _h, t, _ = attns[0].shape
    r = torch.eye(t, device=x.device).expand(b, t, t)
    for a, g in zip(attns, grads, strict=True):
        cam = (g * a.detach()).clamp_min(0).mean(1)
        r = r + cam @ r
    return _normalise(r[:, 0, p:].detach())


@torch.no_grad()
def occlusion_map(model: nn.Module, x: torch.Tensor, semantic: torch.Tensor | None = None,
                  target: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Leave-one-out token occlusion: the drop of the target probability (default: the
    predicted class) when patch i alone is removed from the token sequence (true removal,
    :func:`vitsem.audit.tokens.predict_leave_one_out`). N shortened sequences per image,
    batched as (B * N) rows in chunks of about ``chunk`` rows."""
    b = len(x)
    n = token_count(model, x)
    base = model(x).softmax(-1)
    cls = _target(base, target)
    p_full = base.gather(1, cls[:, None])[:, 0]
    per = max(1, chunk // n)  # images per chunk
    out = []
    for i in range(0, b, per):
        probs = predict_leave_one_out(model, x[i:i + per]).softmax(-1)  # (k, N, C)
        k = len(probs)
        idx = cls[i:i + k, None, None].expand(k, n, 1)
        out.append(p_full[i:i + k, None] - probs.gather(2, idx)[..., 0])
    return _normalise(torch.cat(out))


def random_map(model: nn.Module, x: torch.Tensor, semantic: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Uniform random scores per patch: the chance baseline, seeded by the batch's pixels so a
    run is reproducible and different batches get different draws."""
    n = token_count(model, x)
    g = torch.Generator().manual_seed(int(x.double().abs().sum().item() * 1000) % 2**31)
    return _normalise(torch.rand(len(x), n, generator=g))


def token_count(model: nn.Module, x: torch.Tensor) -> int:
    """N, the number of patch tokens of ``model`` for images ``x``."""
    from vitsem.method.attention import token_layout

    return token_layout(model, (int(x.shape[-2]), int(x.shape[-1]))).grid.num_patches


AttributionMap = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

MAPS: dict[str, AttributionMap] = {
    "semantic": semantic_attention,
    "cls_last": cls_attention_last,
    "rollout": attention_rollout,
    "gradcam": gradcam_tokens,
    "gae": generic_attention,
    "occlusion": occlusion_map,
    "random": random_map,
}
"""Registry of attribution maps by name."""
