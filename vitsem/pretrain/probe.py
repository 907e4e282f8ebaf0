"""Evaluation of a pre-trained encoder on labelled data: linear probe and k-NN accuracy on
frozen features."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitsem.errors import ProbeDataError


def check_probe_data(train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
    for name, labels in (("training", train_labels), ("evaluation", test_labels)):
        if len(labels) == 0:
            raise ProbeDataError(f"the probe's {name} set is empty; give labelled images "
                                 "(a benchmark folder's train and test splits)")
    classes = torch.unique(train_labels)
    if len(classes) < 2:
        raise ProbeDataError(
            f"the probe's training set holds one class ({int(classes[0])}); accuracy of a "
            "one-class probe says nothing: give images of at least two classes")


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, *, weight_decay: float = 1e-3,
                          iterations: int = 100) -> float:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS,
    deterministic), accuracy on the test features."""
    check_probe_data(train_y, test_y)
    tr, te = _standardise(train_x.double(), test_x.double())
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(tr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(tr @ w + b, train_y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((te @ w + b).argmax(1) == test_y).double().mean())


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20, *, standardise: bool = False) -> float:
    """Cosine k-NN: each test image takes the majority class of its k nearest training
    images (ties to the nearer neighbours' class by similarity-weighted vote). With
    ``standardise`` the features are first standardised by the training features' mean and
    standard deviation, as for the linear probe (MAE's BatchNorm without affine): a few
    large shared dimensions no longer decide the cosine."""
    check_probe_data(train_y, test_y)
    tr, te = train_x.double(), test_x.double()
    if standardise:
        tr, te = _standardise(tr, te)
    a = F.normalize(tr, dim=1)
    q = F.normalize(te, dim=1)
    k = min(k, len(a))
    sim, idx = (q @ a.T).topk(k, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = torch.zeros(len(q), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], 1.0 + 1e-3 * sim)
    return float((votes.argmax(1) == test_y).double().mean())


@torch.no_grad()
def encode_all(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """Features of ``images`` (M, 3, H, W) in batches, on ``device``, returned on the CPU."""
    out = [features(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def epochs_to_target(curve: list[float], target: float) -> float:
    """First epoch (1-based) whose accuracy reaches ``target``; NaN when none does."""
    hits = np.flatnonzero(np.asarray(curve) >= target - 1e-12)
    return float(hits[0] + 1) if len(hits) else float("nan")
