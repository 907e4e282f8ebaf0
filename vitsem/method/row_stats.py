"""Per-query reductions of one chunk of a block's patch-to-patch attention, in one pass.

The statistics of :mod:`vitsem.method.analysis` need, per query row of A_pp, its mass on
each concentration level, its mean attention distance and its entropy. Computed eagerly
that is six passes over a (B, H, R, N) chunk (row max, shift, exp, a level matmul, the
distance product, the entropy product), each bound by memory traffic. Compiled with
``torch.compile`` the same function becomes one fused loop that reads the scores once
(``bench/bench_core.py`` measures the whole analysis against plain inference).

Compilation needs a C++ compiler (CPU) or Triton (CUDA) and takes seconds once per process
and shape (torch caches the kernels on disk), so only large maps use it
(:data:`FUSED_MIN_ELEMENTS`). Where it is unavailable, fails, or is switched off
(``VITSEM_FUSED_STATS=0``), :func:`row_reductions` runs the eager reference
:func:`row_reductions_eager`, which gives the same figures to float32 rounding.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable

import torch

__all__ = ["FUSED_MIN_ELEMENTS", "fused_stats_enabled", "row_reductions",
           "row_reductions_eager", "row_reductions_fused", "use_fused"]

_log = logging.getLogger(__name__)

RowReductions = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(level_mass (B, H, R, K), distance (B, H, R), entropy (B, H, R)) of A_pp's rows."""


def fused_stats_enabled() -> bool:
    """Whether :func:`row_reductions` tries the compiled kernel: ``VITSEM_FUSED_STATS``
    (``1`` by default; ``0``, ``false``, ``no`` or ``off`` switch it off)."""
    value = os.environ.get("VITSEM_FUSED_STATS", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


_failed: set[str] = set()
"""Device types where the kernel failed to compile: they run eager from then on."""

FUSED_MIN_ELEMENTS = 2**21
"""Blocks with fewer attention entries (B * H * N * N) than this stay eager: compiling takes
seconds once per process and shape, which only a large map repays (vit_small at 224 px
crosses it from batch 10; the tiny test models never do)."""


def use_fused(shape: torch.Size | tuple[int, ...], device: str = "cpu") -> bool:
    """Whether a block of attention ``shape`` (B, H, T, S) on ``device`` (its type) goes
    through the compiled kernel: large enough, switched on, and not failed there before."""
    b, h, t, s = shape
    return (fused_stats_enabled() and b * h * t * s >= FUSED_MIN_ELEMENTS
            and device not in _failed)


def row_reductions_fused(scores: torch.Tensor, onehot: torch.Tensor,
                         distances: torch.Tensor) -> RowReductions:
    """Reductions of A_pp = softmax over keys of ``scores`` (B, H, R, N) raw patch scores
    (-inf where masked), with ``onehot`` (B, N, K) level membership of the keys and
    ``distances`` (R, N) from each query to each key in patch units.

    Written for the compiler: per-level masked sums instead of a matmul, so that every
    reduction reads the same exp() in one loop."""
    shifted = scores - scores.amax(-1, keepdim=True)
    e = torch.exp(shifted)
    inv_row = e.sum(-1).reciprocal()  # r > 0: the row maximum contributes exp(0) = 1
    masses = [(e * onehot[:, None, None, :, k]).sum(-1) for k in range(onehot.shape[-1])]
    level_mass = torch.stack(masses, -1) * inv_row[..., None]
    distance = (e * distances).sum(-1) * inv_row
    # H = log r - sum_j E l / r, E = exp(l); a masked key (E = 0, l = -inf) adds nothing.
    plogit = torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
    entropy = -plogit * inv_row - inv_row.log()
    return level_mass, distance, entropy


def row_reductions_eager(scores: torch.Tensor, onehot_and_ones: torch.Tensor,
                         distances: torch.Tensor, masked: bool,
                         scratch: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> RowReductions:
    """The reference for :func:`row_reductions_fused`, tuned for eager execution.

    ``scores`` (B, H, R, N) is overwritten with the shifted scores; ``onehot_and_ones``
    (B, N, K + 1) is the level membership with a column of ones; ``masked`` whether any
    score may be -inf; ``scratch`` two reusable buffers shaped like ``scores``."""
    b, h, r, _ = scores.shape
    k = onehot_and_ones.shape[-1] - 1
    e_buf, prod = scratch if scratch is not None else (torch.empty_like(scores),
                                                       torch.empty_like(scores))
    shifted = scores.sub_(scores.amax(-1, keepdim=True))
    e = torch.exp(shifted, out=e_buf)
    # One batched matmul gives each query's mass on every level and its row sum r.
    # (B, H * R, N) @ (B, N, K + 1): one bmm per image, not a broadcast over heads.
    sums = torch.bmm(e.flatten(1, 2), onehot_and_ones).view(b, h, r, k + 1)
    inv_row = sums[..., k].reciprocal()
    level_mass = sums[..., :k] * inv_row[..., None]
    distance = torch.mul(e, distances, out=prod).sum(-1) * inv_row
    if masked:  # 0 * -inf where a key is masked out: it contributes nothing
        plogit = torch.mul(e, shifted, out=prod).nan_to_num_(nan=0.0).sum(-1)
    else:  # a row-wise dot product, without the elementwise temporary
        plogit = torch.einsum("bhrn,bhrn->bhr", e, shifted)
    entropy = plogit.mul_(inv_row).neg_().sub_(inv_row.log())
    return level_mass, distance, entropy


_compiled: Callable[..., RowReductions] | None = None
_guard = threading.RLock()
"""Held while the kernel compiles and runs: torch.compile is not thread-safe (pytorch issues
105943, 118260), and flows analyse shards on threads. Each call uses every core anyway."""


def _compiled_kernel() -> Callable[..., RowReductions]:
    global _compiled
    with _guard:
        if _compiled is None:
            # The default dynamic=None: the first shape compiles static, a second (the last,
            # shorter chunk or batch) recompiles with symbolic sizes; dynamic=True measured
            # slower to compile and recompiled all the same (equal sizes share a symbol).
            _compiled = torch.compile(row_reductions_fused, fullgraph=True)
        return _compiled


def row_reductions(scores: torch.Tensor, onehot_and_ones: torch.Tensor,
                   distances: torch.Tensor, masked: bool,
                   scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                   fused: bool = True) -> RowReductions:
    """Row reductions of A_pp from raw patch ``scores`` (B, H, R, N): the compiled kernel
    when ``fused`` (see :func:`use_fused`) and it compiles on this device type, else
    :func:`row_reductions_eager` (which overwrites ``scores``)."""
    device = scores.device.type
    if fused and device not in _failed:
        try:
            with _guard:
                return _compiled_kernel()(scores, onehot_and_ones[..., :-1], distances)
        except Exception as exc:  # no compiler, no Triton, an unsupported device
            _failed.add(device)
            first_line = (str(exc).splitlines() or [""])[0][:200]
            msg = (f"vitsem: the fused attention-statistics kernel could not compile on "
                   f"{device} ({type(exc).__name__}: {first_line}); "
                   "using the eager path, same figures, slower. Install a C++ compiler "
                   "(CPU) or Triton (CUDA), or set VITSEM_FUSED_STATS=0 to silence this.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            _log.warning(msg)
    return row_reductions_eager(scores, onehot_and_ones, distances, masked, scratch)
