"""Small pieces shared by every loop that trains or evaluates a model: the classifier
trainer, the audit's repair and guided pre-training."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def in_batches(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """``fn`` over aligned slices of ``tensors`` (all (B, ...)), ``batch_size`` rows at a
    time, results concatenated along the first axis. With ``device`` (a model's, say) each
    slice is moved there and each result back to the CPU: the whole input stays in host
    memory, one batch at a time on the accelerator."""
    n = len(tensors[0])
    if device is None or torch.device(device).type == "cpu":
        return torch.cat([fn(*(t[i:i + batch_size] for t in tensors))
                          for i in range(0, n, batch_size)])
    return torch.cat([fn(*(t[i:i + batch_size].to(device) for t in tensors)).cpu()
                      for i in range(0, n, batch_size)])


@torch.inference_mode()
def predict_labels(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B,) predicted class of each image in ``x`` (B, 3, H, W); the model is put in eval
    mode."""
    model.eval()
    return in_batches(lambda xb: model(xb).argmax(-1), x, batch_size=batch_size,
                      device=model_device(model))


def group_accuracy(pred: np.ndarray, labels: np.ndarray, groups: Sequence[str]
                   ) -> dict[str, float]:
    """Accuracy per group name, groups sorted by name; ``pred``, ``labels`` (B,)."""
    correct = np.asarray(pred) == np.asarray(labels)
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inverse, weights=correct, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    return {str(n): float(s / c) for n, s, c in zip(names, sums, counts, strict=True)}


def warmup_cosine_lr(base_lr: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine decay
    to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps)
                                         / max(1, total_steps - warmup_steps)))
