"""The ``summary.*`` scalars of tracked runs: what a person sorts and compares nightly audits
by in the MLflow runs table, and the pattern signatures ``vitsem compare`` diffs."""

from __future__ import annotations

from typing import Any

from vitsem.audit.verdicts import Verdict, relied_on
from vitsem.method.pipeline import AnalysisResult

__all__ = ["UNREVIEWED", "analysis_scalars", "audit_scalars", "metric_name",
           "relied_on_signatures"]


def metric_name(*parts: str) -> str:
    # MLflow metric names allow letters, digits, "_", "-", ".", " " and "/" only.
    return ".".join(p.replace(":", "-") for p in parts)


def analysis_scalars(result: AnalysisResult) -> dict[str, float]:
    """``summary.*`` scalars of an analysis: the largest and the mean layer semantic lift."""
    lifts = [r["semantic_lift"] for r in result.layer_profile()
             if r["semantic_lift"] == r["semantic_lift"]]
    if not lifts:
        return {}
    return {"summary.max_semantic_lift": float(max(lifts)),
            "summary.mean_semantic_lift": float(sum(lifts) / len(lifts))}


UNREVIEWED = (Verdict.SHORTCUT.value, Verdict.REVIEW.value)
"""Verdicts of a relied-on pattern nobody has reviewed yet."""


def audit_scalars(summary: dict[str, Any], map_name: str = "semantic") -> dict[str, float]:
    """``summary.*`` scalars of an audit, sortable in the runs table: accuracy and worst-group
    accuracy of the model as it is, relied-on / unreviewed / reviewed-shortcut patterns of the
    method's map, and each map's faithfulness (ABPC)."""
    findings = summary["findings"].get(map_name, [])
    verdicts = [f.get("verdict", "") for f in findings]
    plain = summary["prompts"].get("none", {})
    out = {"summary.relied_on_patterns": float(sum(relied_on(f) for f in findings)),
           "summary.unreviewed_patterns": float(sum(v in UNREVIEWED for v in verdicts)),
           "summary.reviewed_shortcuts": float(verdicts.count(Verdict.REVIEWED_SHORTCUT.value))}
    for key in ("accuracy", "worst_group_accuracy"):
        if plain.get(key) is not None:
            out[f"summary.{key}"] = float(plain[key])
    for name, faith in (summary.get("faithfulness") or {}).items():
        if faith.get("abpc") == faith.get("abpc") and faith.get("abpc") is not None:
            out[metric_name("summary", "abpc", name)] = float(faith["abpc"])
    return out


def relied_on_signatures(summary: dict[str, Any], map_name: str = "semantic") -> list[str]:
    """Signatures of the relied-on patterns of the method's map (what ``vitsem compare``
    diffs between two audits)."""
    return sorted({f["signature"] for f in summary["findings"].get(map_name, [])
                   if relied_on(f) and f.get("signature")})
