"""Review decisions in SQL: a person's ``shortcut`` / ``legitimate`` decision on a confirmed
finding of an audit, kept per model family so that later audits of the family carry it
(:func:`vitsem.audit.verdicts.carry_review`)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
from sqlalchemy import select

from vitsem.audit.verdicts import Decision, PatternKey, ReviewDecision
from vitsem.errors import ReviewInputError
from vitsem.platform.storage.db import AuditFinding, MetadataStore, ReviewDecisionRow, upsert

__all__ = ["last_findings", "load_reviews", "record_review"]


def last_findings(meta: MetadataStore, model_checksum: str, map_name: str = "semantic",
                  confirmed_only: bool = True) -> list[AuditFinding]:
    """The findings of ``map_name`` in the latest audit of the model with ``model_checksum``
    (best first); the confirmed ones only unless told otherwise."""
    with meta.session() as s:
        latest = s.scalar(select(AuditFinding.audit_digest)
                          .where(AuditFinding.model_checksum == model_checksum)
                          .order_by(AuditFinding.created_at.desc(), AuditFinding.id.desc())
                          .limit(1))
        if latest is None:
            return []
        q = select(AuditFinding).where(AuditFinding.audit_digest == latest,
                                       AuditFinding.map_name == map_name)
        if confirmed_only:
            q = q.where(AuditFinding.confirmed.is_(True))
        return list(s.scalars(q.order_by(AuditFinding.rank)))


def _decision(row: ReviewDecisionRow) -> ReviewDecision:
    return ReviewDecision(
        PatternKey(row.family, row.class_name, row.signature), Decision(row.decision),
        np.asarray(row.centroids, np.float32).reshape(-1, 128),
        np.asarray(row.radii, np.float32),
        float("nan") if row.excess_effect is None else row.excess_effect, row.reviewer,
        row.note, row.decided_at.isoformat() if row.decided_at else "")


def load_reviews(meta: MetadataStore, family: str) -> list[ReviewDecision]:
    """Every decision recorded for the model ``family``, oldest first."""
    with meta.session() as s:
        rows = s.scalars(select(ReviewDecisionRow).where(ReviewDecisionRow.family == family)
                         .order_by(ReviewDecisionRow.decided_at, ReviewDecisionRow.id))
        return [_decision(r) for r in rows]


def record_review(meta: MetadataStore, finding_id: int, decision: Decision | str,
                  reviewer: str, note: str = "", family: str | None = None) -> ReviewDecision:
    """Record a decision on the finding ``finding_id`` (an ``audit_findings`` row): its
    pattern (class, signature, centroids, radii) under the model family the audit named
    (or ``family``), with its excess removal effect now. A decision on a pattern already
    decided replaces the old one."""
    decision = Decision(decision)
    if not reviewer.strip():
        raise ReviewInputError("a review decision needs a reviewer: give --reviewer NAME")
    with meta.session() as s:
        f = s.get(AuditFinding, finding_id)
        if f is None:
            raise ReviewInputError(f"no audit finding with id {finding_id}; list the last "
                                   "audit's findings with `vitsem review list`")
        if not f.confirmed:
            raise ReviewInputError(
                f"finding {finding_id} ({f.map_name} #{f.rank}, class {f.class_name}) was not "
                "confirmed by the causal check; only patterns the model relies on are reviewed")
        pattern = f.evidence.get("pattern")
        fam = family or f.evidence.get("family")
        if not pattern or not fam:
            raise ReviewInputError(
                f"finding {finding_id} was stored without its pattern or model family (an "
                "audit of an older vitsem); run the audit again and review the new finding")
        effect = f.effect if f.effect is not None else math.nan
        random = f.random_effect if f.random_effect is not None else math.nan
        excess = effect - random
        row = {"family": str(fam), "class_name": f.class_name,
               "signature": str(f.evidence.get("signature", "")), "decision": decision.value,
               "centroids": pattern["centroids"], "radii": pattern["radii"],
               "excess_effect": None if math.isnan(excess) else excess,
               "reviewer": reviewer, "note": note, "finding_id": f.id,
               "audit_digest": f.audit_digest, "decided_at": dt.datetime.now(dt.UTC)}
        upsert(s, ReviewDecisionRow, [row], ["family", "class_name", "signature"],
               update=[k for k in row if k not in ("family", "class_name", "signature")])
        saved = s.scalars(select(ReviewDecisionRow).where(
            ReviewDecisionRow.family == row["family"],
            ReviewDecisionRow.class_name == row["class_name"],
            ReviewDecisionRow.signature == row["signature"])).one()
        return _decision(saved)
