"""One verdict vocabulary for audit findings, and the review decisions people record.

Without object masks the audit cannot tell a shortcut from a legitimate part of the object
that the model relies on (a digit's stroke, a bird's beak): a confirmed pattern is then
*relied on — review*, never *shortcut*. A person's decision (shortcut / legitimate) is kept
as a :class:`ReviewDecision` under a :class:`PatternKey` (model family, class, pattern
signature), and later audits of the same family carry it, so a scheduled audit flags only
new or regressed patterns. The HTML report, the CLI and flow summaries read the labels from
:data:`VERDICTS`, never spell them themselves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

__all__ = ["BLIND_SPOTS", "VERDICTS", "Carried", "Decision", "PatternKey", "ReviewDecision",
           "Verdict", "VerdictInfo", "carry_review", "pattern_signature", "relied_on",
           "same_pattern", "verdict_of"]


class Verdict(StrEnum):
    SHORTCUT = "shortcut"
    REVIEW = "review"
    ON_OBJECT = "on_object"
    NOT_CONFIRMED = "not_confirmed"
    REVIEWED_SHORTCUT = "reviewed_shortcut"
    REVIEWED_LEGITIMATE = "reviewed_legitimate"


@dataclass(frozen=True)
class VerdictInfo:
    label: str
    meaning: str
    relied_on: bool
    """Whether the causal check confirmed that the model relies on the pattern."""


VERDICTS: dict[Verdict, VerdictInfo] = {
    Verdict.SHORTCUT: VerdictInfo(
        "shortcut", "confirmed by removal and off the object (object masks given)", True),
    Verdict.REVIEW: VerdictInfo(
        "relied on — review", "confirmed by removal; without object masks the audit cannot "
        "tell a shortcut from a legitimate object part: a person decides", True),
    Verdict.ON_OBJECT: VerdictInfo(
        "relied on — on the object", "confirmed by removal and on the object (object masks "
        "given): a legitimate cue", True),
    Verdict.NOT_CONFIRMED: VerdictInfo(
        "not confirmed", "removing the pattern hurts no more than removing random patches",
        False),
    Verdict.REVIEWED_SHORTCUT: VerdictInfo(
        "shortcut (reviewed)", "confirmed; a person recorded it as a shortcut", True),
    Verdict.REVIEWED_LEGITIMATE: VerdictInfo(
        "legitimate (reviewed)", "confirmed; a person recorded it as legitimate", True),
}
"""Registry: the label and meaning of every verdict."""

BLIND_SPOTS = (
    "cues without SIFT keypoints: a colour cast, a global brightness or contrast change, "
    "a flat colour patch or smooth gradient; one at a fixed place is proposed by its place "
    "when a map ranks it high in many images of a class, one that moves is not (the other "
    "candidates start from keypoints), and the semantic map, which weighs attention by "
    "keypoints, ranks a keypoint-free pattern low wherever it is",
    "patterns spread so thinly that no keypoint recurs across images of one class",
    "cues the model reads from the whole image at once (an image-wide texture is found "
    "only where its keypoints recur)",
)
"""What the method cannot see; the report states these."""


def relied_on(finding: Mapping[str, Any]) -> bool:
    """Whether a finding summary (``Finding.summary()``) is a pattern the model relies on."""
    return VERDICTS[Verdict(finding["verdict"])].relied_on


def verdict_of(confirmed: bool, on_object: float, on_object_limit: float) -> Verdict:
    """The verdict before review. ``on_object``: the object's mean coverage of the pattern's
    patches, NaN without masks (then a confirmed pattern goes to review)."""
    if not confirmed:
        return Verdict.NOT_CONFIRMED
    if math.isnan(on_object):
        return Verdict.REVIEW
    return Verdict.ON_OBJECT if on_object >= on_object_limit else Verdict.SHORTCUT


class Decision(StrEnum):
    SHORTCUT = "shortcut"
    LEGITIMATE = "legitimate"


def pattern_signature(centroids: np.ndarray, dims: int = 16) -> str:
    """A short, stable name of a descriptor pattern (K, 128): which ``dims`` dimensions of
    its unit-normalised mean descriptor are largest, hashed. Near-copies of one pattern in
    another audit give the same set of dimensions far more often than exact descriptors
    agree; :func:`same_pattern` is the exact test."""
    c = np.asarray(centroids, np.float64).reshape(-1, 128)
    if not len(c):  # a pattern found by its place (no descriptor)
        return hashlib.sha256(b"position").hexdigest()[:16]
    mean = c.mean(0)
    top = np.sort(np.argsort(-mean, kind="stable")[:dims])
    return hashlib.sha256(top.astype(np.int16).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class PatternKey:
    """The key of a recorded decision (and of the part-2 SQL row): model ``family`` (the
    registered model name), the ``class_name`` the pattern pushes towards, and its
    ``signature``."""

    family: str
    class_name: str
    signature: str


@dataclass(frozen=True)
class ReviewDecision:
    """A person's decision on a pattern, with what identifies it again: the descriptor
    ``centroids`` (K, 128) and ``radii`` (K,), and the excess removal effect it had."""

    key: PatternKey
    decision: Decision
    centroids: np.ndarray = field(repr=False, compare=False)
    radii: np.ndarray = field(repr=False, compare=False)
    excess_effect: float = float("nan")
    reviewer: str = ""
    note: str = ""
    decided_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.key.family, "class_name": self.key.class_name,
                "signature": self.key.signature, "decision": self.decision.value,
                "centroids": np.asarray(self.centroids, np.float32).tolist(),
                "radii": np.asarray(self.radii, np.float32).tolist(),
                "excess_effect": self.excess_effect, "reviewer": self.reviewer,
                "note": self.note, "decided_at": self.decided_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReviewDecision:
        return cls(PatternKey(d["family"], d["class_name"], d["signature"]),
                   Decision(d["decision"]), np.asarray(d["centroids"], np.float32),
                   np.asarray(d["radii"], np.float32), float(d.get("excess_effect", "nan")),
                   d.get("reviewer", ""), d.get("note", ""), d.get("decided_at", ""))


def same_pattern(centroids: np.ndarray, radii: np.ndarray, decision: ReviewDecision) -> bool:
    """Two patterns are the same when some centroid of one lies within the radius (the
    larger of the two) of some centroid of the other."""
    a = np.asarray(centroids, np.float64).reshape(-1, 128)
    b = np.asarray(decision.centroids, np.float64).reshape(-1, 128)
    d = np.sqrt(np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None], 0))
    limit = np.maximum(np.asarray(radii)[:, None], np.asarray(decision.radii)[None, :])
    return bool((d <= limit).any())


@dataclass(frozen=True)
class Carried:
    """A finding after review decisions are carried: ``verdict`` (reviewed where a decision
    matches), the matching ``decision`` (or None), and ``flag``: ``new`` (relied on, never
    reviewed), ``regressed`` (reviewed, but its excess effect grew by more than the margin),
    or ``""`` (nothing to look at)."""

    verdict: Verdict
    decision: ReviewDecision | None
    flag: str


def carry_review(family: str, class_name: str, centroids: np.ndarray, radii: np.ndarray,
                 verdict: Verdict, excess_effect: float,
                 decisions: Sequence[ReviewDecision], margin: float = 0.1) -> Carried:
    """Apply the recorded decisions of ``family`` to one finding."""
    relied = VERDICTS[verdict].relied_on
    match = next((d for d in decisions if d.key.family == family
                  and d.key.class_name == class_name and same_pattern(centroids, radii, d)),
                 None)
    if match is None:
        return Carried(verdict, None, "new" if relied else "")
    if not relied:
        return Carried(verdict, match, "")
    reviewed = (Verdict.REVIEWED_SHORTCUT if match.decision is Decision.SHORTCUT
                else Verdict.REVIEWED_LEGITIMATE)
    grew = not math.isnan(match.excess_effect) and excess_effect > match.excess_effect + margin
    return Carried(reviewed, match, "regressed" if grew else "")
