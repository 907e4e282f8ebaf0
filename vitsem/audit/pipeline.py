"""The spurious-correlation audit on arrays (METHOD.md §3), one harness for every map.

For each attribution map (the method's ``semantic`` map and the baselines): discover
recurring keypoint patterns in the most-attributed patches per predicted class, confirm the
top candidates by removing their tokens against matched random removals, score each image's
reliance on the top candidate, and prompt the model by removing the confirmed shortcut's
tokens. Storage and orchestration live elsewhere; this module sees arrays and a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vitsem.audit.causal import CausalResult, causal_check, matched_random_drop
from vitsem.audit.discovery import Candidate, discover_candidates
from vitsem.audit.maps import MAPS
from vitsem.audit.scores import off_object_semantic_attention, patch_coverage
from vitsem.audit.tokens import predict_without
from vitsem.errors import AuditInputError
from vitsem.method.attention import token_layout
from vitsem.method.concentration import TokenGrid, concentration, patch_weights
from vitsem.method.keypoints import Keypoints
from vitsem.method.view import ModelView

METHOD = "semantic"
"""The method's own map; every other entry of ``MAPS`` is a baseline."""


@dataclass(frozen=True)
class AuditConfig:
    """Audit settings. ``top_fraction``: share of patches counted as most attributed;
    ``max_checked``: candidates per map given the causal check; ``alpha``/``min_effect``:
    significance and minimum probability drop (beyond random) that confirm a candidate;
    ``on_object_limit``: a confirmed candidate whose patches the object covers at least this
    much is the object itself, not a shortcut (needs masks); ``keep_fraction``: patches kept
    by the keep-top-k prompt."""

    maps: tuple[str, ...] = tuple(MAPS)
    weighting: str = "count"
    top_fraction: float = 0.1
    eps_factor: float = 0.3
    min_recurrence: float = 0.3
    min_enrichment: float = 1.5
    max_checked: int = 4
    causal_trials: int = 5
    alpha: float = 0.01
    min_effect: float = 0.05
    on_object_limit: float = 0.5
    keep_fraction: float = 0.5
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        unknown = [m for m in self.maps if m not in MAPS]
        if unknown or not self.maps:
            raise ValueError(f"unknown attribution maps {unknown}; choose from {sorted(MAPS)}")
        for name in ("top_fraction", "keep_fraction", "alpha", "on_object_limit",
                     "min_recurrence"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if self.max_checked < 1 or self.causal_trials < 1 or self.batch_size < 1:
            raise ValueError("max_checked, causal_trials and batch_size must be >= 1")


@dataclass
class AuditData:
    """What is audited. ``views`` (B, H, W, 3) uint8 model views; ``keypoints`` with SIFT
    descriptors; ``labels`` (B,) indices into ``class_names`` (the model's classes);
    optional ``groups`` (B,) names (default: the class), object ``masks`` (B, H, W) in view
    pixels, ``clean`` (B,) bool for images known to hold no shortcut, and file ``names``."""

    views: np.ndarray
    keypoints: Sequence[Keypoints]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] | None = None
    masks: np.ndarray | None = None
    clean: np.ndarray | None = None
    names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.views)


@dataclass(frozen=True)
class Finding:
    """A candidate shortcut of one map, with its causal check. ``on_object``: mean object
    coverage of its patches (NaN without masks); ``shortcut``: confirmed and off the object;
    ``confidence``: 1 - p of the causal test (0 when untested)."""

    rank: int
    cls: int
    class_name: str
    images: int
    recurrence: float
    other_rate: float
    attention_lift: float
    on_object: float
    causal: CausalResult
    shortcut: bool
    patches: np.ndarray = field(repr=False, compare=False)

    @property
    def confidence(self) -> float:
        p = self.causal.p_value
        return 0.0 if math.isnan(p) else 1.0 - p

    def summary(self) -> dict[str, Any]:
        return {"rank": self.rank, "class": self.cls, "class_name": self.class_name,
                "images": self.images, "recurrence": self.recurrence,
                "other_rate": self.other_rate, "attention_lift": self.attention_lift,
                "on_object": self.on_object, "confirmed": self.causal.confirmed,
                "shortcut": self.shortcut, "confidence": self.confidence,
                "effect": self.causal.effect, "random_effect": self.causal.random_effect,
                "p_value": self.causal.p_value, "checked_images": self.causal.images,
                "patches_per_image": float(self.patches.sum(1)[self.patches.any(1)].mean())
                if self.patches.any() else 0.0}


@dataclass(frozen=True)
class PromptOutcome:
    """Accuracy of a prompt (a set of removed patches per image) on the audited data.
    ``clean_accuracy``: on images known to hold no shortcut (None when unknown);
    ``changed``: share of predictions that differ from the unprompted model."""

    accuracy: float
    worst_group_accuracy: float
    worst_group: str
    group_accuracy: dict[str, float]
    clean_accuracy: float | None
    removed_per_image: float
    changed: float


@dataclass
class MapAudit:
    """One map's findings (best first), per-image reliance on its top finding (B,) and the
    off-object share of the map (B,; NaN without masks)."""

    map: str
    findings: list[Finding]
    reliance: np.ndarray
    off_object: np.ndarray
    attribution: np.ndarray = field(repr=False)

    @property
    def top(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    @property
    def shortcuts(self) -> list[Finding]:
        return [f for f in self.findings if f.shortcut]


@dataclass
class AuditResult:
    """Everything the audit found. ``prompts`` maps a prompt name to its outcome: ``none``
    (the model as is), ``drop:<map>`` (the map's confirmed shortcuts removed), ``random``
    (as many random patches removed as ``drop:semantic``), ``keep_top_k`` (only the most
    semantic patches kept). ``status`` is ``ok`` or ``nothing_to_report`` with ``notes``."""

    class_names: list[str]
    grid: TokenGrid
    labels: np.ndarray
    predicted: np.ndarray
    groups: list[str]
    maps: dict[str, MapAudit]
    prompts: dict[str, PromptOutcome]
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    semantic_weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def class_table(self) -> list[dict[str, Any]]:
        """Per true class: images, accuracy, share predicted, mean reliance and off-object
        share of the method's map."""
        rows = []
        method = self.maps.get(METHOD)
        for c, name in enumerate(self.class_names):
            sel = self.labels == c
            if not sel.any():
                continue
            row: dict[str, Any] = {
                "class": name, "images": int(sel.sum()),
                "accuracy": float((self.predicted[sel] == c).mean()),
                "predicted_share": float((self.predicted == c).mean())}
            if method is not None:
                row["reliance"] = float(method.reliance[sel].mean())
                off = method.off_object[sel]
                row["off_object"] = float(np.nanmean(off)) if np.isfinite(off).any() else None
            rows.append(row)
        return rows

    def image_rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per image: label, prediction, group and each map's scores."""
        rows = []
        for i in range(self.num_images):
            row: dict[str, Any] = {
                "image": names[i] if names is not None else str(i),
                "label": self.class_names[int(self.labels[i])],
                "predicted": self.class_names[int(self.predicted[i])],
                "group": self.groups[i]}
            for name, m in self.maps.items():
                row[f"reliance.{name}"] = float(m.reliance[i])
                row[f"off_object.{name}"] = float(m.off_object[i])
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (no per-image arrays)."""
        return {
            "status": self.status, "notes": self.notes, "images": self.num_images,
            "class_names": self.class_names, "grid": list(self.grid.grid_hw),
            "classes": self.class_table(),
            "findings": {k: [f.summary() for f in m.findings] for k, m in self.maps.items()},
            "prompts": {k: asdict(v) for k, v in self.prompts.items()},
        }


# ---------------------------------------------------------------------------------------------


def check_audit_data(data: AuditData, num_model_classes: int) -> None:
    """Refuse input the audit cannot answer, saying what to change."""
    b = len(data)
    if b == 0:
        raise AuditInputError("no usable images to audit (all were rejected or the folder "
                              "is empty); check the rejected list and the data path")
    if len(data.keypoints) != b or len(data.labels) != b:
        raise AuditInputError(f"{b} views but {len(data.keypoints)} keypoint sets and "
                              f"{len(data.labels)} labels; they must align")
    if len(data.class_names) != num_model_classes:
        raise AuditInputError(
            f"the model has {num_model_classes} output classes but the labels name "
            f"{len(data.class_names)} ({', '.join(data.class_names[:8])}); audit a model "
            "trained on these classes, or give labels in the model's classes")
    present = np.unique(data.labels)
    if len(present) < 2:
        only = data.class_names[int(present[0])] if len(present) else "none"
        raise AuditInputError(
            f"the data set holds one class ({only}); a shortcut is a pattern that separates "
            "classes, so the audit needs images of at least two classes")
    if data.masks is not None and data.masks.shape[:1] != (b,):
        raise AuditInputError(f"{len(data.masks)} masks for {b} images; they must align")


def _predictor(model: nn.Module, batch_size: int) -> Any:
    @torch.no_grad()
    def predict(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.cat([predict_without(model, x[i:i + batch_size], drop[i:i + batch_size])
                          for i in range(0, len(x), batch_size)])
    return predict


def _keypoint_arrays(keypoints: Sequence[Keypoints], grid: TokenGrid
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: descriptors (K, 128) and patch index (K,) of keypoints inside the grid."""
    desc, patches = [], []
    for k in keypoints:
        if k.descriptors is None:
            raise AuditInputError("keypoints without SIFT descriptors; extract them with "
                                  "SiftParams(descriptors=True)")
        idx = grid.patch_index(k.xy) if len(k) else np.zeros(0, np.int64)
        inside = idx >= 0
        desc.append(np.asarray(k.descriptors, np.float32).reshape(-1, 128)[inside])
        patches.append(idx[inside])
    return desc, patches


def group_accuracy(pred: np.ndarray, labels: np.ndarray, groups: Sequence[str]
                   ) -> dict[str, float]:
    correct = pred == labels
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inverse, weights=correct, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    return {str(n): float(s / c) for n, s, c in zip(names, sums, counts, strict=True)}


def prompt_outcome(pred: np.ndarray, base: np.ndarray, labels: np.ndarray,
                   groups: Sequence[str], clean: np.ndarray | None, removed: np.ndarray
                   ) -> PromptOutcome:
    groups_acc = group_accuracy(pred, labels, groups)
    worst = min(groups_acc, key=lambda g: groups_acc[g])
    clean_acc = (float((pred[clean] == labels[clean]).mean())
                 if clean is not None and clean.any() else None)
    return PromptOutcome(float((pred == labels).mean()), groups_acc[worst], worst, groups_acc,
                         clean_acc, float(removed.sum(1).mean()), float((pred != base).mean()))


def _keep_top_k(weights: np.ndarray, keep: int) -> np.ndarray:
    """(B, N) bool removal mask that keeps each image's ``keep`` most semantic patches;
    images without keypoints keep everything."""
    b, n = weights.shape
    order = np.argsort(-weights, axis=1, kind="stable")
    drop = np.ones((b, n), bool)
    np.put_along_axis(drop, order[:, :keep], False, 1)
    drop[weights.sum(1) == 0] = False
    return drop


def _matched_random(removed: np.ndarray, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return matched_random_drop(torch.from_numpy(removed), g).numpy()


def _safe_removal(drop: np.ndarray) -> np.ndarray:
    """Never remove every patch of an image: such rows keep all patches instead."""
    out = drop.copy()
    out[out.all(1)] = False
    return out


def audit(model: nn.Module, view: ModelView, data: AuditData, cfg: AuditConfig = AuditConfig()
          ) -> AuditResult:
    """Run the audit of ``model`` on ``data`` with every map in ``cfg.maps``."""
    cfg.validate()
    model.eval()
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    check_audit_data(data, num_classes)
    grid = token_layout(model, view.hw).grid
    n = grid.num_patches
    labels = np.asarray(data.labels, np.int64)
    groups = list(data.groups) if data.groups is not None else [
        data.class_names[int(c)] for c in labels]
    predict = _predictor(model, cfg.batch_size)
    x = view.to_tensor(data.views)
    none = np.zeros((len(data), n), bool)
    base = predict(x, torch.from_numpy(none)).argmax(-1).numpy()

    def outcome(drop: np.ndarray) -> PromptOutcome:
        drop = _safe_removal(drop)
        pred = base if not drop.any() else predict(x, torch.from_numpy(drop)).argmax(-1).numpy()
        return prompt_outcome(pred, base, labels, groups, data.clean, drop)

    conc = np.stack([concentration(k, grid, cfg.weighting) for k in data.keypoints])
    weights = patch_weights(conc)
    result = AuditResult(data.class_names, grid, labels, base, groups, {},
                         {"none": outcome(none)}, semantic_weights=weights)
    desc, kp_patches = _keypoint_arrays(data.keypoints, grid)
    if sum(len(d) for d in desc) == 0:
        result.status = "nothing_to_report"
        result.notes.append(
            f"no SIFT keypoint in any of the {len(data)} images, so there is no recurring "
            "pattern to test; the images may be blank or too small for SIFT")
        return result
    coverage = None
    if data.masks is not None:
        coverage = np.stack([patch_coverage(m > 0, grid) for m in data.masks])
    w_tensor = torch.from_numpy(weights).float()
    for name in cfg.maps:
        result.maps[name] = _audit_map(name, model, x, w_tensor, base, desc, kp_patches,
                                       coverage, weights, data.class_names, predict, cfg)
        result.prompts[f"drop:{name}"] = outcome(np.any(
            [f.patches for f in result.maps[name].shortcuts] or [none], axis=0))
    ref = result.maps.get(METHOD) or next(iter(result.maps.values()))
    removed = _safe_removal(np.any([f.patches for f in ref.shortcuts] or [none], axis=0))
    result.prompts["random"] = outcome(_matched_random(removed, cfg.seed))
    keep = max(1, round(cfg.keep_fraction * n))
    result.prompts["keep_top_k"] = outcome(_keep_top_k(weights, keep))
    if not any(m.shortcuts for m in result.maps.values()):
        result.notes.append("no candidate was confirmed as a shortcut by the causal check")
    return result


def _attribution(name: str, model: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                 batch_size: int) -> np.ndarray:
    fn = MAPS[name]
    return torch.cat([fn(model, x[i:i + batch_size], weights[i:i + batch_size]).detach()
                      for i in range(0, len(x), batch_size)]).numpy().astype(np.float64)


def _audit_map(name: str, model: nn.Module, x: torch.Tensor, w: torch.Tensor,
               predicted: np.ndarray, desc: list[np.ndarray], kp_patches: list[np.ndarray],
               coverage: np.ndarray | None, weights: np.ndarray, class_names: list[str],
               predict: Any, cfg: AuditConfig) -> MapAudit:
    attribution = _attribution(name, model, x, w, cfg.batch_size)
    grid_hw = token_layout(model, (int(x.shape[-2]), int(x.shape[-1]))).grid.grid_hw
    candidates = discover_candidates(
        desc, kp_patches, attribution, predicted, top_fraction=cfg.top_fraction,
        eps_factor=cfg.eps_factor, min_recurrence=cfg.min_recurrence,
        min_enrichment=cfg.min_enrichment, grid_hw=grid_hw)
    checked: list[tuple[Candidate, np.ndarray, CausalResult, float]] = []
    for cand in candidates[: cfg.max_checked]:
        patches = cand.patches
        rows = (predicted == cand.cls) & patches.any(1)
        target = torch.full((int(rows.sum()),), cand.cls, dtype=torch.long)
        causal = causal_check(predict, x[torch.from_numpy(rows)], target,
                              torch.from_numpy(patches[rows]), trials=cfg.causal_trials,
                              seed=cfg.seed, alpha=cfg.alpha, min_effect=cfg.min_effect)
        on_object = float(coverage[patches].mean()) if coverage is not None and patches.any() \
            else float("nan")
        checked.append((cand, patches, causal, on_object))

    def is_shortcut(causal: CausalResult, on_object: float) -> bool:
        return causal.confirmed and not on_object >= cfg.on_object_limit  # NaN: unknown

    # Confirmed shortcuts first (largest effect beyond random), then the rest by score.
    checked.sort(key=lambda t: (not is_shortcut(t[2], t[3]), not t[2].confirmed,
                                -(t[2].effect - t[2].random_effect) if t[2].confirmed
                                else -t[0].score))
    findings = [Finding(rank, c.cls, class_names[c.cls], c.images, c.recurrence, c.other_rate,
                        c.attention_lift, on_obj, causal, is_shortcut(causal, on_obj), patches)
                for rank, (c, patches, causal, on_obj) in enumerate(checked, 1)]
    reliance = (attribution * findings[0].patches).sum(1) if findings else np.zeros(len(x))
    off = (off_object_semantic_attention(attribution, weights > 0, coverage)
           if coverage is not None else np.full(len(x), np.nan))
    return MapAudit(name, findings, reliance, off, attribution)
