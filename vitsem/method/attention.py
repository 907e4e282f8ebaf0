"""Capture the softmax attention of every block of a timm Vision Transformer.

timm computes attention with fused SDPA, which returns no weights. Instead of switching
the model to its slower explicit path, vitsem intercepts the kernel call itself: while a
capture is active, ``torch.nn.functional.scaled_dot_product_attention`` is wrapped, and a
call made from inside one of the model's attention modules hands its final ``q``, ``k``
(after rotary embeddings and q/k norms), ``attn_mask`` (relative position bias, padding) and
``scale`` to a lazy :class:`AttentionBlock` before the kernel runs. The model's own
computation is untouched, so its outputs are bit-for-bit the same with and without capture,
and the hooks and the wrapper are removed when the context exits. A module that runs timm's
explicit path (``fused_attn = False``) is read at its ``attn_drop`` input, which is its
softmax attention.

Which attention modules are read is a registry of timm classes (:data:`ATTENTION_MODULES`);
models with attention that is no single per-head softmax over all tokens are refused with
the reason (:data:`REFUSED_ATTENTION`), never captured approximately.

The block computes its map on demand, over query-row chunks sized from a memory budget
(:data:`DEFAULT_MEMORY_BUDGET`), so a sink that reduces the map never holds a (B, H, T, T)
tensor; ``probs`` / ``logits`` / ``log_partition`` still give the whole map for sinks that
want it.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vitsem.errors import UnsupportedModelError
from vitsem.method.attention_block import (
    DEFAULT_MEMORY_BUDGET,
    AttentionBlock,
    AttentionRows,
    Workspace,
)
from vitsem.method.concentration import TokenGrid

__all__ = [
    "ATTENTION_MODULES", "DEFAULT_MEMORY_BUDGET", "REFUSED_ATTENTION", "AttentionBlock",
    "AttentionRows", "AttentionSink", "TokenLayout", "Workspace", "attention_modules",
    "capture_attention", "extract_attention", "num_layers_heads", "token_layout",
]

ATTENTION_MODULES: dict[str, str] = {
    "timm.layers.attention.Attention": "ViT self-attention (vit_*, deit*, dinov2, siglip, "
                                       "aimv2, hybrids, NaFlexViT, ViTamin, ...)",
    "timm.layers.attention.AttentionRope": "rotary self-attention (vit_*_rope*, dinov3)",
    "timm.models.eva.EvaAttention": "EVA / EVA02 / PE attention, rotary after q/k norms",
    "timm.models.beit.Attention": "BEiT attention, relative position bias as the mask",
    "timm.models.vision_transformer_relpos.RelPosAttention": "relative-position ViT "
                                                             "attention (vit_relpos_*)",
    "timm.models.vision_transformer.ParallelScalingBlock": "parallel ViT block "
                                                           "(vit_*_parallel, ViT-22B style)",
}
"""timm modules (``module.qualname``) read by the capture: each computes one softmax
attention of all tokens over all tokens per forward, through SDPA or its ``attn_drop``."""

REFUSED_ATTENTION: dict[str, str] = {
    "timm.models.cait.TalkingHeadAttn": (
        "CaiT's talking-heads attention mixes the heads' logits before the softmax and the "
        "probabilities after it, so no per-head softmax map exists to capture"),
    "timm.models.cait.ClassAttn": (
        "class attention (CaiT, XCiT) has the CLS token as its only query, so there is no "
        "token-to-token map"),
    "timm.layers.diff_attention.DiffAttention": (
        "differential attention is the difference of two softmax maps, not one softmax"),
    "timm.models.vision_transformer.DiffParallelScalingBlock": (
        "differential attention is the difference of two softmax maps, not one softmax"),
}
"""Attention modules refused by name, with the reason given in the error."""

def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _family(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


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


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules (:data:`ATTENTION_MODULES`) in depth order.

    Raises :class:`UnsupportedModelError` naming the family when the model has attention
    that the capture cannot read exactly (:data:`REFUSED_ATTENTION`) or none at all."""
    mods = []
    for m in model.modules():
        name = _qualname(m)
        if name in REFUSED_ATTENTION:
            raise UnsupportedModelError(
                f"{_family(model)}: {REFUSED_ATTENTION[name]}; vitsem cannot capture its "
                "attention exactly. Use a ViT with global softmax self-attention "
                "(vit_*, deit*, eva*, beit*, vit_relpos_*, dinov2/3)")
        if name in ATTENTION_MODULES:
            mods.append(m)
    if not mods:
        raise UnsupportedModelError(
            f"{_family(model)} has no timm ViT attention blocks (global softmax "
            "self-attention modules: " + ", ".join(sorted(ATTENTION_MODULES)) + "); vitsem "
            "supports timm ViT families: vit_*, deit*, eva*, beit*, vit_relpos_*, dinov2/3")
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


_CAPTURE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary())
_LOCKS_GUARD = threading.Lock()


def _capture_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _CAPTURE_LOCKS.get(model)
        if lock is None:
            lock = _CAPTURE_LOCKS[model] = threading.RLock()
        return lock


class _Frame:
    """One attention module's forward in progress on the capturing thread."""

    def __init__(self, layer: int, module: nn.Module, tokens: int, on_block: Callable[
            [_Frame, AttentionBlock], None]) -> None:
        self.layer, self.module, self.tokens, self.on_block = layer, module, tokens, on_block
        self.calls = 0


_ACTIVE = threading.local()
"""``frame``: the :class:`_Frame` of the attention module running on this thread, if any."""

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_WRAP_GUARD = threading.Lock()
_WRAP_USERS = 0

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _sdpa_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` that first hands q, k and the mask to the capture
    when called from inside a captured attention module on this thread."""
    frame: _Frame | None = getattr(_ACTIVE, "frame", None)
    if frame is not None:
        a = dict(zip(_SDPA_PARAMS, args, strict=False)) | kwargs
        q, k = a["query"], a["key"]
        scale = a.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        if a.get("enable_gqa") and q.shape[-3] != k.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)  # SDPA's own expansion
        frame.calls += 1
        block = AttentionBlock(q, k, float(scale), a.get("attn_mask"),
                               bool(a.get("is_causal", False)))
        frame.on_block(frame, block)
    return _ORIGINAL_SDPA(*args, **kwargs)


def _install_spy() -> None:
    global _WRAP_USERS
    with _WRAP_GUARD:
        if _WRAP_USERS == 0:
            F.scaled_dot_product_attention = _sdpa_spy
        _WRAP_USERS += 1


def _remove_spy() -> None:
    global _WRAP_USERS
    with _WRAP_GUARD:
        _WRAP_USERS -= 1
        if _WRAP_USERS == 0:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA


@contextmanager
def capture_attention(model: nn.Module, sink: AttentionSink,
                      memory_budget: int | None = None) -> Iterator[None]:
    """Within the context, every forward pass calls ``sink(layer, block)`` per block with its
    :class:`AttentionBlock`, before the block's attention runs.

    The block is valid only during the call: reduce it inside the sink (chunk by chunk to
    keep within ``memory_budget`` bytes, default :data:`DEFAULT_MEMORY_BUDGET`), or
    ``clone()`` what you keep. Captures of one model from several threads run one after
    another, and only forward passes of the capturing thread reach the sink.
    """
    with _capture_lock(model):
        yield from _capture(model, sink, memory_budget)


def _capture(model: nn.Module, sink: AttentionSink,
             memory_budget: int | None) -> Iterator[None]:
    mods = attention_modules(model)
    handles: list[RemovableHandle] = []
    ws = Workspace()
    owner = threading.get_ident()

    def on_block(frame: _Frame, block: AttentionBlock) -> None:
        if block.shape[-2] != frame.tokens or block.shape[-1] != frame.tokens:
            raise UnsupportedModelError(
                f"{_family(model)}: block {frame.layer} attends {block.shape[-2]} queries to "
                f"{block.shape[-1]} keys over a sequence of {frame.tokens} tokens (windowed or "
                "pooled attention); vitsem captures only global self-attention")
        block.memory_budget = memory_budget or block.memory_budget
        block._ws = ws
        with torch.no_grad():
            sink(frame.layer, block)

    for layer, mod in enumerate(mods):

        def pre_hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     layer: int = layer) -> None:
            if threading.get_ident() != owner:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            _ACTIVE.frame = _Frame(layer, m, int(x.shape[-2]), on_block)

        def post_hook(m: nn.Module, _args: Any, _out: Any) -> None:
            if threading.get_ident() != owner:
                return
            frame: _Frame | None = getattr(_ACTIVE, "frame", None)
            _ACTIVE.frame = None
            if frame is not None and frame.calls != 1:
                raise UnsupportedModelError(
                    f"{_family(model)}: attention module {frame.layer} "
                    f"({type(m).__name__}) computed {frame.calls} attention maps in one "
                    "forward; vitsem captures exactly one softmax map per module")

        def explicit_hook(_m: nn.Module, args: tuple[Any, ...], mod: nn.Module = mod) -> None:
            # timm's explicit path: attn_drop receives softmax(q k^T * scale + bias).
            frame: _Frame | None = getattr(_ACTIVE, "frame", None)
            if (threading.get_ident() != owner or frame is None or frame.module is not mod
                    or getattr(mod, "fused_attn", True)):
                return
            frame.calls += 1
            probs = args[0].detach().float()
            on_block(frame, AttentionBlock.from_logits(probs.log(), memory_budget))

        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(post_hook))
        drop = getattr(mod, "attn_drop", None)
        if isinstance(drop, nn.Module):
            handles.append(drop.register_forward_pre_hook(explicit_hook))
    _install_spy()
    try:
        yield
    finally:
        _ACTIVE.frame = None
        _remove_spy()
        for h in handles:
            h.remove()


def extract_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                   list[torch.Tensor]]:
    """Run ``model(x)`` and return (output, per-block attention maps (B, H, T, T)).

    Keeps every map in memory, by design: L * B * H * T * T * 4 bytes, whatever the memory
    budget. For analysis over many images or at high resolution use
    :func:`capture_attention` with a sink that reduces each block chunk by chunk.
    """
    maps: list[torch.Tensor] = []
    with capture_attention(model, lambda _layer, block: maps.append(block.probs)):
        out = model(x)
    return out, maps
