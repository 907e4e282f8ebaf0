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

DEFAULT_MEMORY_BUDGET: dict[str, int] = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
"""Bytes per device type that a block's chunked map may take at a time; other devices use
the CPU figure."""

_FLOAT_BYTES = 4


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _family(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


@dataclass(frozen=True)
class AttentionRows:
    """Query rows ``start .. start + R`` of one block's attention, float32, no autograd.

    ``probs`` (B, H, R, S) is ``softmax(q k^T * scale + mask)``; ``logits`` (B, H, R, S) the
    scaled scores minus each row's maximum (-inf where masked) and ``log_partition``
    (B, H, R, 1) ``log sum_j exp(logits)``, so ``log probs = logits - log_partition``.
    """

    start: int
    probs: torch.Tensor
    logits: torch.Tensor
    log_partition: torch.Tensor


class Workspace:
    """Reusable flat float32 buffers viewed to the shape asked for. Fresh 10-100 MB tensors
    per block would be mapped and page-faulted anew by the allocator every time, which costs
    more than the matmul; a flat buffer also serves the smaller last chunk."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size,
            device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get((name, device))
        if buf is None or buf.numel() < numel:
            buf = self._bufs[(name, device)] = torch.empty(numel, dtype=torch.float32,
                                                           device=device)
        return buf[:numel].view(shape)


class AttentionBlock:
    """One block's attention (B, H, T, S), computed from its final q and k on demand.

    ``scores(rows, keys)`` gives raw scaled, masked scores for a slice of query rows and
    keys, ``rows(start, stop)`` normalised :class:`AttentionRows`, ``chunks()`` the rows in
    pieces that fit ``memory_budget`` bytes. Tensors from ``scores``/``rows``/``chunks`` live
    in buffers that the next call overwrites. ``probs``, ``logits`` (shifted by the row
    maximum) and ``log_partition`` (B, H, T, 1) are the whole map as fresh tensors, computed
    once: they take B * H * T * S * 4 bytes each, whatever the budget. ``masked`` says
    whether any logit may be -inf.
    """

    def __init__(self, q: torch.Tensor | None, k: torch.Tensor | None, scale: float,
                 mask: torch.Tensor | None, causal: bool, *, logits: torch.Tensor | None = None,
                 memory_budget: int | None = None, workspace: Workspace | None = None) -> None:
        self._q, self._k, self._scale, self._mask, self._causal = q, k, scale, mask, causal
        self._raw = logits
        self._ws = workspace or Workspace()
        ref = logits if logits is not None else q
        assert ref is not None
        self.device = ref.device
        if logits is not None:
            b, h, t, s = logits.shape
            self.masked = bool(torch.isinf(logits).any())
        else:
            assert q is not None and k is not None
            b, h, t, _ = q.shape
            s = k.shape[-2]
            self.masked = causal or (mask is not None and (
                mask.dtype == torch.bool or bool(torch.isinf(mask).any())))
        self.shape = torch.Size((b, h, t, s))
        self.memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET.get(
            self.device.type, DEFAULT_MEMORY_BUDGET["cpu"])
        self._kt: torch.Tensor | None = None
        self._full: AttentionRows | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, memory_budget: int | None = None
                    ) -> AttentionBlock:
        """A block from raw attention scores (B, H, T, S), e.g. ``probs.log()``."""
        return cls(None, None, 1.0, None, False, logits=logits.detach().float(),
                   memory_budget=memory_budget)

    @property
    def num_queries(self) -> int:
        return int(self.shape[-2])

    def chunk_rows(self, buffers: int = 3, keys: int | None = None) -> int:
        """Query rows per chunk so that ``buffers`` float32 (B, H, rows, keys) tensors fit
        the memory budget (at least one row)."""
        b, h, _, s = self.shape
        per_row = b * h * (s if keys is None else keys) * _FLOAT_BYTES * buffers
        return max(1, self.memory_budget // max(per_row, 1))

    def _key_t(self) -> torch.Tensor:
        """k^T (B, H, d, S), a transposed view of k packed contiguous once per block: packing
        k as it lies is far cheaper than packing its transpose, and bmm reads either."""
        if self._kt is None:
            assert self._k is not None
            self._kt = self._k.detach().float().contiguous().transpose(-2, -1)
        return self._kt

    def scores(self, rows: slice, keys: slice = slice(None), out: str | None = "scores"
               ) -> torch.Tensor:
        """Raw scores ``q k^T * scale + mask`` (B, H, R, K) of query ``rows`` against
        ``keys`` (slices of the token axis), float32, in the workspace buffer ``out`` (a
        fresh tensor when None)."""
        b, h, t, s = self.shape
        r0, r1, _ = rows.indices(t)
        k0, k1, _ = keys.indices(s)
        shape = (b, h, r1 - r0, k1 - k0)
        buf = (torch.empty(shape, device=self.device) if out is None
               else self._ws.get(out, shape, self.device))
        if self._raw is not None:
            return buf.copy_(self._raw[:, :, r0:r1, k0:k1])
        assert self._q is not None
        q = self._q.detach()[:, :, r0:r1]
        # q is a strided view into the qkv projection: packing it (scale folded in) lets the
        # batched matmul run without hidden copies.
        qs = torch.mul(q, self._scale, out=self._ws.get("q", q.shape, self.device))
        # bmm into the buffer: a 4-d matmul with ``out`` computes into a temporary and copies.
        torch.bmm(qs.flatten(0, 1), self._key_t()[..., k0:k1].flatten(0, 1),
                  out=buf.view(b * h, r1 - r0, k1 - k0))
        if self._causal:
            keep = torch.ones(r1 - r0, k1 - k0, dtype=torch.bool, device=self.device)
            keep = keep.tril(r0 - k0)
            buf.masked_fill_(~keep, float("-inf"))
        if self._mask is not None:
            m = self._mask
            if m.ndim >= 2 and m.shape[-2] != 1:
                m = m[..., r0:r1, :]
            if m.shape[-1] != 1:
                m = m[..., k0:k1]
            if m.dtype == torch.bool:
                buf.masked_fill_(~m, float("-inf"))
            else:
                buf.add_(m.detach().float())
        return buf

    def rows(self, start: int, stop: int) -> AttentionRows:
        """Normalised query rows ``start:stop`` over all keys, in workspace buffers."""
        logits = self.scores(slice(start, stop), out="logits")
        probs = self._ws.get("probs", logits.shape, self.device)
        return self._normalise(start, logits, probs)

    @staticmethod
    def _normalise(start: int, logits: torch.Tensor, probs: torch.Tensor) -> AttentionRows:
        logits.sub_(logits.amax(-1, keepdim=True))
        torch.exp(logits, out=probs)
        partition = probs.sum(-1, keepdim=True)
        probs.div_(partition)
        return AttentionRows(start, probs, logits, partition.log_())

    def chunks(self, rows: int | None = None) -> Iterator[AttentionRows]:
        """:class:`AttentionRows` over all query rows, ``rows`` at a time (default: what
        fits the memory budget with the two buffers it needs)."""
        step = rows or self.chunk_rows(2)
        for start in range(0, self.num_queries, step):
            yield self.rows(start, min(start + step, self.num_queries))

    def _whole(self) -> AttentionRows:
        if self._full is None:
            logits = self.scores(slice(None), out=None)
            self._full = self._normalise(0, logits, torch.empty_like(logits))
        return self._full

    @property
    def probs(self) -> torch.Tensor:
        """(B, H, T, S) softmax attention, the whole map."""
        return self._whole().probs

    @property
    def logits(self) -> torch.Tensor:
        """(B, H, T, S) scaled scores minus each row's maximum, the whole map."""
        return self._whole().logits

    @property
    def log_partition(self) -> torch.Tensor:
        """(B, H, T, 1) ``log sum_j exp(logits)``."""
        return self._whole().log_partition


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
