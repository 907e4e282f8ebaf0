"""What the audit works on and what it finds: the data, findings, prompting outcomes and
the result document (arrays in, typed results out, each with a JSON-able ``summary``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vitsem.audit.causal import CausalResult
from vitsem.audit.faithfulness import Faithfulness
from vitsem.audit.repair import RepairOutcome
from vitsem.audit.verdicts import (
    BLIND_SPOTS,
    VERDICTS,
    ReviewDecision,
    Verdict,
    pattern_signature,
)
from vitsem.method.concentration import TokenGrid
from vitsem.method.keypoints import Keypoints

METHOD = "semantic"
"""The method's own map; every other entry of ``MAPS`` is a baseline."""


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
    """A candidate shortcut of one map, with its causal check on its grown patch set.
    ``on_object``: mean object coverage of its patches (NaN without masks); ``verdict``: see
    :data:`vitsem.audit.verdicts.VERDICTS` (``shortcut`` only with masks);
    ``confidence``: 1 - p of the causal test (0 when untested); ``seed_patches`` (B, N): the
    keypoint patches it was discovered on, ``patches`` (B, N): after growth
    (``growth_levels`` steps); ``centroids`` (K, 128) and ``radii`` (K,): its descriptors;
    ``review``: the recorded decision on the same pattern, when one was carried, and ``flag``:
    ``new`` (relied on, never reviewed), ``regressed`` (reviewed, but relied on more than
    when decided) or ``""``."""

    rank: int
    cls: int
    class_name: str
    images: int
    recurrence: float
    other_rate: float
    attention_lift: float
    on_object: float
    causal: CausalResult
    verdict: Verdict
    patches: np.ndarray = field(repr=False, compare=False)
    seed_patches: np.ndarray = field(repr=False, compare=False)
    centroids: np.ndarray = field(repr=False, compare=False)
    radii: np.ndarray = field(repr=False, compare=False)
    growth_levels: int = 0
    review: ReviewDecision | None = field(default=None, compare=False)
    flag: str = ""

    @property
    def shortcut(self) -> bool:
        return self.verdict in (Verdict.SHORTCUT, Verdict.REVIEWED_SHORTCUT)

    @property
    def relied_on(self) -> bool:
        """Confirmed and not known to be legitimate: a shortcut (found or reviewed), or one
        to review."""
        return self.verdict in (Verdict.SHORTCUT, Verdict.REVIEW, Verdict.REVIEWED_SHORTCUT)

    @property
    def signature(self) -> str:
        return pattern_signature(self.centroids)

    @staticmethod
    def _per_image(mask: np.ndarray) -> float:
        return float(mask.sum(1)[mask.any(1)].mean()) if mask.any() else 0.0

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
                "verdict": self.verdict.value, "verdict_label": VERDICTS[self.verdict].label,
                "patches_per_image": self._per_image(self.patches),
                "seed_patches_per_image": self._per_image(self.seed_patches),
                "growth_levels": self.growth_levels, "signature": self.signature,
                "flag": self.flag, "review": None if self.review is None else {
                    k: v for k, v in self.review.to_dict().items()
                    if k not in ("centroids", "radii")},
                # What identifies the pattern again, for a review decision (confirmed only).
                "pattern": None if not self.causal.confirmed else {
                    "centroids": np.round(np.asarray(self.centroids, np.float64), 3).tolist(),
                    "radii": np.round(np.asarray(self.radii, np.float64), 3).tolist()}}


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

    @property
    def relied(self) -> list[Finding]:
        """Confirmed findings not known to be on the object (shortcuts and ones to review)."""
        return [f for f in self.findings if f.relied_on]


@dataclass
class AuditResult:
    """Everything the audit found. ``prompts`` maps a prompt name to its outcome: ``none``
    (the model as is), ``drop:<map>`` (the map's relied-on findings removed), ``random``
    (as many random patches removed as ``drop:semantic``), ``keep_top_k`` (only the most
    semantic patches kept). ``faithfulness``: per map; ``repairs``: per repair method (empty
    without held-out data), ``reaudit``: the repaired model audited again. ``status`` is
    ``ok`` or ``nothing_to_report`` with ``notes``."""

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
    faithfulness: dict[str, Faithfulness] = field(default_factory=dict)
    repairs: dict[str, RepairOutcome] = field(default_factory=dict)
    masks_given: bool = False
    repaired_models: dict[str, Any] = field(default_factory=dict, repr=False)
    reaudit: dict[str, Any] = field(default_factory=dict)
    """The annotation-free repair's model audited again (its findings and accuracy)."""

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
            "faithfulness": {k: v.summary() for k, v in self.faithfulness.items()},
            "repairs": {k: v.summary() for k, v in self.repairs.items()},
            "reaudit": self.reaudit,
            "masks_given": self.masks_given,
            "verdicts": {v.value: {"label": i.label, "meaning": i.meaning}
                         for v, i in VERDICTS.items()},
            "cannot_see": list(BLIND_SPOTS),
        }

