"""Annotation-free repair: last-layer retraining, group-balanced (DFR-style), on groups the
audit found instead of groups a person annotated.

Deep feature reweighting (Kirichenko, Izmailov & Wilson, 2023) keeps the network and
retrains only its linear head on a held-out labelled split in which every group
(class x spurious attribute) is equally represented. Here the spurious attribute is a
*pseudo-group*: whether the image holds a pattern the audit confirmed (its descriptors
matched anywhere in the image). The same retraining with the true groups is the ceiling
(oracle); the unrepaired model is the floor. The repaired model is the same timm model with
new head weights, saved like any other (:func:`vitsem.method.models.save_checkpoint`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from vitsem.errors import RepairInputError
from vitsem.method.training import in_batches, model_device, predict_labels

__all__ = ["RepairOutcome", "RepairResult", "evaluate", "fit_balanced_head", "gap_closed",
           "linear_head", "penultimate_features", "pseudo_groups", "repair_last_layer",
           "with_head"]


def linear_head(model: nn.Module) -> nn.Linear:
    """The model's classification head, refused unless it is one linear layer."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise RepairInputError(
            f"{type(model).__name__}.head is {type(head).__name__}, not a linear layer; the "
            "last-layer repair retrains a linear classification head: give a timm "
            "VisionTransformer with num_classes > 0")
    return head


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 128
                         ) -> np.ndarray:
    """(B, D) inputs of the linear head (timm's ``forward_head(pre_logits=True)``)."""
    vit: Any = model
    if not hasattr(vit, "forward_features") or not hasattr(vit, "forward_head"):
        raise RepairInputError(f"{type(model).__name__} lacks forward_features/forward_head; "
                               "the repair needs a timm model")
    model.eval()
    return in_batches(lambda xb: vit.forward_head(vit.forward_features(xb), pre_logits=True),
                      x, batch_size=batch_size, device=model_device(model)).double().numpy()


def pseudo_groups(labels: np.ndarray, present: np.ndarray, class_names: Sequence[str]
                  ) -> list[str]:
    """Group names ``<class>|pattern`` / ``<class>|no-pattern`` from a (B,) presence flag."""
    return [f"{class_names[int(c)]}|{'pattern' if p else 'no-pattern'}"
            for c, p in zip(labels, present, strict=True)]


def check_groups(labels: np.ndarray, groups: Sequence[str], class_names: Sequence[str],
                 expected: Sequence[str] | None, min_images: int, min_per_group: int) -> None:
    """Refuse held-out data that cannot balance groups: too few images, an ``expected``
    group without images, or a group smaller than ``min_per_group``."""
    if len(labels) < min_images:
        raise RepairInputError(
            f"{len(labels)} held-out images; the last-layer repair needs at least {min_images}"
            " labelled images it was not trained on: hold out more of the labelled data")
    names, counts = np.unique(np.asarray(groups), return_counts=True)
    have = dict(zip(names.tolist(), counts.tolist(), strict=True))
    empty = [g for g in (expected or []) if g not in have]
    if empty:
        raise RepairInputError(
            f"held-out group(s) {empty} hold no image, so they cannot be balanced; add "
            "held-out images of those groups (e.g. images of the class without the pattern)")
    small = {g: c for g, c in have.items() if c < min_per_group}
    if small:
        raise RepairInputError(
            f"held-out groups {small} have fewer than {min_per_group} images each; add "
            "held-out images of those groups")
    missing = sorted(set(range(len(class_names))) - set(np.unique(labels).tolist()))
    if missing:
        raise RepairInputError(f"held-out images of class(es) {[class_names[c] for c in missing]}"
                               " are missing; every class needs held-out images")


def fit_balanced_head(features: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                      num_classes: int, *, c: float = 1.0, subsamples: int = 10,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A linear head (W (C, D), b (C,)) fitted on group-balanced draws: each draw takes as
    many images from every group as the smallest group has, fits an L2 logistic regression
    on standardised features, and the draws' weights are averaged (DFR). Returns weights
    for the raw features."""
    g = np.asarray(groups)
    names, inverse = np.unique(g, return_inverse=True)
    smallest = int(np.bincount(inverse).min())
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    rng = np.random.default_rng(seed)
    w_sum = np.zeros((num_classes, features.shape[1]))
    b_sum = np.zeros(num_classes)
    for _ in range(subsamples):
        idx = np.concatenate([rng.choice(np.flatnonzero(inverse == k), smallest, replace=False)
                              for k in range(len(names))])
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(z[idx], labels[idx])
        coef, bias = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for class 1
            coef, bias = np.vstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        full_w = np.zeros_like(w_sum)
        full_b = np.full(num_classes, -1e4)  # a class absent from the draw is never chosen
        full_w[clf.classes_] = coef
        full_b[clf.classes_] = bias
        w_sum += full_w
        b_sum += full_b
    w, b = w_sum / subsamples, b_sum / subsamples
    return w / std, b - (w / std) @ mean


def with_head(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """A copy of ``model`` whose linear head holds ``weight`` (C, D) and ``bias`` (C,)."""
    head = linear_head(model)
    if weight.shape != tuple(head.weight.shape):
        raise RepairInputError(f"head weights {weight.shape} do not fit the model's head "
                               f"{tuple(head.weight.shape)}")
    out = copy.deepcopy(model)
    new = linear_head(out)
    with torch.no_grad():
        new.weight.copy_(torch.as_tensor(weight, dtype=new.weight.dtype))
        new.bias.copy_(torch.as_tensor(bias, dtype=new.bias.dtype))
    return out.eval()


@dataclass(frozen=True)
class RepairOutcome:
    """A model's accuracy on the evaluated data: overall, worst group (and its name), per
    group; ``gap_closed`` the share of the floor -> oracle worst-group gap it closes (NaN
    when there is no oracle or no gap); ``fit_groups`` the held-out group sizes it was
    fitted on (empty for the floor)."""

    method: str
    accuracy: float
    worst_group_accuracy: float
    worst_group: str
    group_accuracy: dict[str, float]
    gap_closed: float = float("nan")
    fit_groups: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "accuracy": self.accuracy,
                "worst_group_accuracy": self.worst_group_accuracy,
                "worst_group": self.worst_group, "group_accuracy": self.group_accuracy,
                "gap_closed": self.gap_closed, "fit_groups": self.fit_groups}


def evaluate(method: str, predicted: np.ndarray, labels: np.ndarray, groups: Sequence[str],
             fit_groups: dict[str, int] | None = None) -> RepairOutcome:
    correct = np.asarray(predicted) == np.asarray(labels)
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    acc = np.bincount(inverse, weights=correct) / np.bincount(inverse)
    by_group = {str(n): float(a) for n, a in zip(names, acc, strict=True)}
    worst = min(by_group, key=lambda k: by_group[k])
    return RepairOutcome(method, float(correct.mean()), by_group[worst], worst, by_group,
                         fit_groups=fit_groups or {})


def gap_closed(outcome: RepairOutcome, floor: RepairOutcome, oracle: RepairOutcome) -> float:
    """(worst - floor worst) / (oracle worst - floor worst); NaN when the oracle does not
    beat the floor (no gap to close)."""
    gap = oracle.worst_group_accuracy - floor.worst_group_accuracy
    if gap <= 1e-9:
        return float("nan")
    return (outcome.worst_group_accuracy - floor.worst_group_accuracy) / gap


@dataclass
class RepairResult:
    """Outcomes by method (``none`` = floor, ``dfr:pseudo`` = from the audit's findings,
    ``dfr:oracle`` = true groups, ``dfr:class`` = class-balanced without groups) and the
    repaired models."""

    outcomes: dict[str, RepairOutcome]
    models: dict[str, nn.Module] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v.summary() for k, v in self.outcomes.items()}


def repair_last_layer(model: nn.Module, held_x: torch.Tensor, held_labels: np.ndarray,
                      held_present: np.ndarray, eval_x: torch.Tensor, eval_labels: np.ndarray,
                      eval_groups: Sequence[str], class_names: Sequence[str], *,
                      held_true_groups: Sequence[str] | None = None, min_images: int = 20,
                      min_per_group: int = 2, c: float = 1.0, subsamples: int = 10,
                      seed: int = 0) -> RepairResult:
    """Retrain ``model``'s head on the held-out split, balanced over the pseudo-groups
    (class x ``held_present`` (B,) bool: the audit's pattern found in the image), and, when
    ``held_true_groups`` are known, over the true groups (the oracle). Every model is
    evaluated on the ``eval_*`` data with its (true) groups."""
    linear_head(model)
    labels = np.asarray(held_labels, np.int64)
    pseudo = pseudo_groups(labels, np.asarray(held_present, bool), class_names)
    expected = [f"{n}|{p}" for n in class_names for p in ("pattern", "no-pattern")]
    check_groups(labels, pseudo, class_names, expected, min_images, min_per_group)
    feats = penultimate_features(model, held_x)
    fits: dict[str, Sequence[str]] = {
        "dfr:pseudo": pseudo, "dfr:class": [class_names[int(c_)] for c_ in labels]}
    if held_true_groups is not None:
        check_groups(labels, held_true_groups, class_names, None, min_images, min_per_group)
        fits["dfr:oracle"] = list(held_true_groups)
    models: dict[str, nn.Module] = {"none": model}
    outcomes = {"none": evaluate("none", predict_labels(model, eval_x, 128).numpy(), eval_labels,
                                 eval_groups)}
    for name, groups in fits.items():
        w, b = fit_balanced_head(feats, labels, groups, len(class_names), c=c,
                                 subsamples=subsamples, seed=seed)
        models[name] = with_head(model, w, b)
        sizes = dict(zip(*np.unique(np.asarray(groups), return_counts=True), strict=True))
        pred = predict_labels(models[name], eval_x, 128).numpy()
        outcomes[name] = evaluate(name, pred, eval_labels, eval_groups,
                                  {str(k): int(v) for k, v in sizes.items()})
    if "dfr:oracle" in outcomes:
        for name, o in list(outcomes.items()):
            outcomes[name] = RepairOutcome(
                o.method, o.accuracy, o.worst_group_accuracy, o.worst_group,
                o.group_accuracy, gap_closed(o, outcomes["none"], outcomes["dfr:oracle"]),
                o.fit_groups)
    return RepairResult(outcomes, models)
