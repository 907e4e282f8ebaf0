"""One block's softmax attention, computed lazily from its final q and k over query-row
chunks sized from a memory budget (:data:`DEFAULT_MEMORY_BUDGET`), so a sink that reduces
the map never holds a (B, H, T, T) tensor. :mod:`vitsem.method.attention` captures the q, k,
mask and scale that each block's kernel receives and hands them over as an
:class:`AttentionBlock`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_MEMORY_BUDGET", "AttentionBlock", "AttentionRows", "Workspace"]

DEFAULT_MEMORY_BUDGET: dict[str, int] = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
"""Bytes per device type that a block's chunked map may take at a time; other devices use
the CPU figure."""

_FLOAT_BYTES = 4


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
