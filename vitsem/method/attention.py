"""Capture the softmax attention of every block of a timm Vision Transformer.

timm computes attention with fused SDPA, which returns no weights. Instead of switching
the model to its slower explicit path, vitsem hooks the per-head query/key (the outputs of
``q_norm`` / ``k_norm``) and recomputes ``softmax(q k^T / sqrt(d))`` beside the model. The
model's own computation is untouched, so its outputs are bit-for-bit the same with and
without capture, and the hooks are removed when the context exits.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vitsem.errors import UnsupportedModelError
from vitsem.method.concentration import TokenGrid


@dataclass(frozen=True)
class AttentionBlock:
    """One block's attention, float32, without autograd.

    ``probs`` (B, H, T, T) is ``softmax(q k^T / sqrt(d) + mask)``; ``logits`` (B, H, T, T) the
    scaled scores minus each row's maximum (-inf where masked) and ``log_partition``
    (B, H, T, 1) ``log sum_j exp(logits)``, so ``log probs = logits - log_partition`` without
    taking a logarithm of the full map. ``masked`` says whether any logit is -inf.
    """

    probs: torch.Tensor
    logits: torch.Tensor
    log_partition: torch.Tensor
    masked: bool

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> AttentionBlock:
        """A block from raw attention scores (B, H, T, T), e.g. ``probs.log()``."""
        shifted = (logits - logits.amax(-1, keepdim=True)).float()
        log_z = shifted.logsumexp(-1, keepdim=True)
        return cls((shifted - log_z).exp(), shifted, log_z, bool(torch.isinf(logits).any()))


AttentionSink = Callable[[int, AttentionBlock], None]
"""Called once per block with (layer index, its :class:`AttentionBlock`)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens sit in the sequence: ``num_prefix`` tokens first (CLS at 0 when
    ``has_cls``, then distillation / register tokens), then the N patch tokens of ``grid``."""

    num_prefix: int
    has_cls: bool
    grid: TokenGrid

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid.num_patches


def _is_vit_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("qkv", "q_norm", "k_norm", "num_heads", "scale"))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in depth order."""
    mods = [m for m in model.modules() if _is_vit_attention(m)]
    if not mods:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no timm ViT attention blocks (modules with qkv, "
            "q_norm, k_norm); vitsem supports timm VisionTransformer models: vit_*, deit_*, "
            "register-token ViTs"
        )
    return mods


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens (CLS, distillation, registers); timm's attribute, 1 when
    a model does not declare it."""
    return int(getattr(model, "num_prefix_tokens", 1))


def token_layout(model: nn.Module, input_hw: tuple[int, int]) -> TokenLayout:
    """Token layout of ``model`` for an input of ``input_hw`` pixels."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "patch_size"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no patch_embed.patch_size; vitsem needs a ViT with a "
            "patch grid"
        )
    ph, pw = (int(v) for v in pe.patch_size)
    h, w = input_hw
    if getattr(pe, "dynamic_img_pad", False):
        gh, gw = -(-h // ph), -(-w // pw)
    else:
        gh, gw = h // ph, w // pw
    num_prefix = num_prefix_tokens(model)
    has_cls = getattr(model, "cls_token", None) is not None
    return TokenLayout(num_prefix, has_cls, TokenGrid((ph, pw), (gh, gw)))


def num_layers_heads(model: nn.Module) -> tuple[int, int]:
    """(number of attention blocks, heads per block)."""
    mods = attention_modules(model)
    heads = {int(m.num_heads) for m in mods}  # type: ignore[arg-type]
    if len(heads) != 1:
        raise UnsupportedModelError(f"blocks have different head counts {sorted(heads)}")
    return len(mods), heads.pop()


class _Workspace:
    """Reusable (B, H, T, T) buffers. Fresh 10-100 MB tensors per block would be mapped and
    page-faulted anew by the allocator every time, which costs more than the matmul."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, tuple[int, ...], torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        key = (name, tuple(shape), device)
        buf = self._bufs.get(key)
        if buf is None:
            self._bufs = {k: v for k, v in self._bufs.items() if k[0] != name}
            buf = self._bufs[key] = torch.empty(shape, dtype=torch.float32, device=device)
        return buf


def _attention_block(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None,
                     causal: bool, ws: _Workspace) -> AttentionBlock:
    """softmax(q k^T * scale + mask) in float32, computed in reused buffers."""
    b, h, t, _ = q.shape
    shape = torch.Size((b, h, t, k.shape[-2]))
    logits = ws.get("logits", shape, q.device)
    # q and k are strided views into the qkv projection; packing them into contiguous buffers
    # (scale folded into q) lets the batched matmul run without hidden copies.
    qc = torch.mul(q, scale, out=ws.get("q", q.shape, q.device))
    kc = ws.get("k", k.shape, k.device).copy_(k)
    torch.matmul(qc, kc.transpose(-2, -1), out=logits)
    masked = causal or (mask is not None and mask.dtype == torch.bool)
    if causal:
        keep = torch.ones(t, shape[-1], dtype=torch.bool, device=q.device).tril()
        logits.masked_fill_(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            logits.masked_fill_(~mask, float("-inf"))
        else:
            logits.add_(mask.float())
            masked = masked or bool(torch.isinf(mask).any())
    logits.sub_(logits.amax(-1, keepdim=True))
    probs = torch.exp(logits, out=ws.get("probs", shape, q.device))
    partition = probs.sum(-1, keepdim=True)
    probs.div_(partition)
    return AttentionBlock(probs, logits, partition.log_(), masked)


_CAPTURE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary())
_LOCKS_GUARD = threading.Lock()


def _capture_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _CAPTURE_LOCKS.get(model)
        if lock is None:
            lock = _CAPTURE_LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def capture_attention(model: nn.Module, sink: AttentionSink) -> Iterator[None]:
    """Within the context, every forward pass calls ``sink(layer, block)`` per block with its
    :class:`AttentionBlock`.

    The block's tensors live in buffers that the next block overwrites: reduce them inside
    the sink, or ``clone()`` what you keep. Captures of one model from several threads run
    one after another, and only forward passes of the capturing thread reach the sink.
    """
    with _capture_lock(model):
        yield from _capture(model, sink)


def _capture(model: nn.Module, sink: AttentionSink) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    ws = _Workspace()
    owner = threading.get_ident()
    for layer, mod in enumerate(attention_modules(model)):
        state: dict[str, Any] = {}

        def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     state: dict[str, Any] = state) -> None:
            if threading.get_ident() != owner:
                return
            state["mask"] = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            state["causal"] = bool(kwargs.get("is_causal", False))

        def q_hook(_m: nn.Module, _inp: Any, q: torch.Tensor,
                   state: dict[str, Any] = state) -> None:
            if threading.get_ident() == owner:
                state["q"] = q

        def k_hook(_m: nn.Module, _inp: Any, k: torch.Tensor, state: dict[str, Any] = state,
                   mod: nn.Module = mod, layer: int = layer) -> None:
            if threading.get_ident() != owner:
                return
            q = state.pop("q")
            with torch.no_grad():
                block = _attention_block(q, k, float(mod.scale),  # type: ignore[arg-type]
                                         state.get("mask"), state.get("causal", False), ws)
                sink(layer, block)

        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(mod.q_norm.register_forward_hook(q_hook))  # type: ignore[union-attr]
        handles.append(mod.k_norm.register_forward_hook(k_hook))  # type: ignore[union-attr]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def extract_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                   list[torch.Tensor]]:
    """Run ``model(x)`` and return (output, per-block attention maps (B, H, T, T)).

    Keeps every map in memory: for analysis over many images use :func:`capture_attention`
    with a sink that reduces each map as it comes.
    """
    maps: list[torch.Tensor] = []
    with capture_attention(model, lambda _layer, block: maps.append(block.probs.clone())):
        out = model(x)
    return out, maps
