"""Audit history of a registered model, read back through ``MlflowClient``: the last audits,
what changed since the one before, and the promotion gate that reads them.

A challenger version becomes champion only when its latest audit confirms no unreviewed
pattern (nor one reviewed as a shortcut) and its worst-group accuracy is not below the
champion's by more than the allowed drop."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from vitsem.errors import RegistryError

__all__ = ["HOLD_TAG", "AuditEvent", "AuditRecord", "GateDecision", "GateRule", "audit_events",
           "audit_history", "changes", "decide", "latest_audit", "promote", "require_alias",
           "set_hold"]

AUDIT_EXPERIMENTS = ("vitsem/spurious_audit", "vitsem/model_audit")
"""Audits log here: standalone, or as children of a model audit."""


@dataclass(frozen=True)
class AuditRecord:
    """One audit run of a model version: its ``summary.*`` scalars and relied-on patterns."""

    run_id: str
    run_name: str
    start_time: int
    """ms since the epoch."""
    version: str
    checksum: str
    dataset_digest: str
    scalars: dict[str, float]
    patterns: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_run(cls, run: Any) -> AuditRecord:
        tags = run.data.tags
        return cls(str(run.info.run_id), str(tags.get("mlflow.runName", run.info.run_name)),
                   int(run.info.start_time), tags.get("vitsem.registered_model.version", ""),
                   tags.get("vitsem.model.checksum", ""), tags.get("vitsem.dataset.digest", ""),
                   {k: float(v) for k, v in run.data.metrics.items()
                    if k.startswith("summary.")},
                   frozenset(p for p in tags.get("vitsem.patterns", "").split(",") if p))

    def get(self, name: str) -> float | None:
        return self.scalars.get(f"summary.{name}")


def _experiment_ids(client: Any) -> list[str]:
    found = [client.get_experiment_by_name(n) for n in AUDIT_EXPERIMENTS]
    return [str(e.experiment_id) for e in found if e is not None]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def audit_history(client: Any, model: str, last: int = 10, version: str | None = None,
                  by: str = "registered_model") -> list[AuditRecord]:
    """The last ``last`` audits of registered model ``model`` (of one ``version`` if given),
    newest first; ``by="model.checksum"`` finds the audits of unregistered weights."""
    ids = _experiment_ids(client)
    if not ids:
        return []
    query = (f"tags.`vitsem.flow` = 'spurious_audit' and "
             f"tags.`vitsem.{by}` = '{_quote(model)}'")
    if version is not None:
        query += f" and tags.`vitsem.registered_model.version` = '{_quote(version)}'"
    runs = client.search_runs(ids, query, max_results=last, order_by=["attributes.start_time DESC"])
    return [AuditRecord.from_run(r) for r in runs if r.info.status == "FINISHED"]


def latest_audit(client: Any, model: str, version: str) -> AuditRecord | None:
    found = audit_history(client, model, 1, version)
    return found[0] if found else None


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def changes(history: list[AuditRecord]) -> list[dict[str, Any]]:
    """One row per audit (newest first) with the change since the audit before it: worst-group
    accuracy and relied-on patterns, and the pattern signatures that appeared or went."""
    rows = []
    for i, rec in enumerate(history):
        prev = history[i + 1] if i + 1 < len(history) else None
        rows.append({
            "run": rec.run_name, "run_id": rec.run_id, "version": rec.version,
            "started": dt.datetime.fromtimestamp(rec.start_time / 1000, dt.UTC).strftime(
                "%Y-%m-%d %H:%M"),
            "data": rec.dataset_digest[:8],
            "worst_group_accuracy": rec.get("worst_group_accuracy"),
            "worst_group_change": _delta(rec.get("worst_group_accuracy"),
                                         prev.get("worst_group_accuracy") if prev else None),
            "relied_on": rec.get("relied_on_patterns"),
            "unreviewed": rec.get("unreviewed_patterns"),
            "abpc": rec.get("abpc.semantic"),
            "appeared": sorted(rec.patterns - prev.patterns) if prev else [],
            "gone": sorted(prev.patterns - rec.patterns) if prev else [],
        })
    return rows


@dataclass(frozen=True)
class GateRule:
    """When a challenger may replace the champion."""

    max_unreviewed: int = 0
    """Relied-on patterns nobody has reviewed (and reviewed shortcuts) allowed."""
    max_worst_group_drop: float = 0.0
    """How far the challenger's worst-group accuracy may fall below the champion's."""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: tuple[str, ...]


def decide(challenger: AuditRecord | None, champion: AuditRecord | None,
           rule: GateRule = GateRule()) -> GateDecision:
    """Whether the audited ``challenger`` may become champion, and why (or why not)."""
    if challenger is None:
        return GateDecision(False, ("the challenger has no finished audit; audit it first "
                                    "(vitsem audit --checkpoint models:/<name>@challenger)",))
    reasons = []
    blocking = (challenger.get("unreviewed_patterns") or 0) + (
        challenger.get("reviewed_shortcuts") or 0)
    if blocking > rule.max_unreviewed:
        reasons.append(f"its audit confirms {blocking:.0f} pattern(s) the model relies on that "
                       "are unreviewed or reviewed as shortcuts (allowed "
                       f"{rule.max_unreviewed}); review them with `vitsem review`")
    new, old = challenger.get("worst_group_accuracy"), (
        champion.get("worst_group_accuracy") if champion else None)
    if new is None:
        reasons.append("its audit has no worst-group accuracy (audit it on labelled data)")
    elif old is not None and new < old - rule.max_worst_group_drop:
        reasons.append(f"worst-group accuracy {new:.3f} is below the champion's {old:.3f} by "
                       f"more than {rule.max_worst_group_drop:.3f}")
    if reasons:
        return GateDecision(False, tuple(reasons))
    why = (f"worst-group accuracy {new:.3f} vs champion {old:.3f}" if old is not None
           else "no champion audit to compare with")
    return GateDecision(True, (f"no unreviewed shortcut; {why}",))


def require_alias(client: Any, model: str, alias: str) -> str:
    """The version ``alias`` points to."""
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except Exception as e:
        raise RegistryError(f"model {model!r} has no alias {alias!r}; set it with "
                            f"`vitsem model register --alias {alias}`") from e


HOLD_TAG = "vitsem.promotion_hold"
"""Registered-model tag: while set (by the automation reacting to an audit event, or by a
person), no version is promoted; its value says why."""


def set_hold(client: Any, model: str, reason: str | None) -> None:
    """Hold promotions of ``model`` (``reason``) or release the hold (None)."""
    if reason is None:
        try:
            client.delete_registered_model_tag(model, HOLD_TAG)
        except Exception:  # no hold to release
            pass
    else:
        client.set_registered_model_tag(model, HOLD_TAG, reason[:4000])


def promote(client: Any, model: str, rule: GateRule = GateRule(),
            challenger: str = "challenger", champion: str = "champion") -> GateDecision:
    """Move alias ``champion`` to the version ``challenger`` points to when :func:`decide`
    allows it and no hold is set; the decision and its reasons are tagged on the challenger
    version either way."""
    version = require_alias(client, model, challenger)
    try:
        current: str | None = str(client.get_model_version_by_alias(model, champion).version)
    except Exception:  # no champion yet
        current = None
    decision = decide(latest_audit(client, model, version),
                      latest_audit(client, model, current) if current else None, rule)
    hold = client.get_registered_model(model).tags.get(HOLD_TAG)
    if hold:
        decision = GateDecision(False, (f"promotions are on hold: {hold}; release with "
                                        f"`vitsem model hold {model} --release`",
                                        *decision.reasons))
    client.set_model_version_tag(model, version, "vitsem.gate",
                                 ("promoted: " if decision.promote else "refused: ")
                                 + "; ".join(decision.reasons))
    if decision.promote:
        client.set_registered_model_alias(model, champion, version)
    return decision


@dataclass(frozen=True)
class AuditEvent:
    """A Prefect event an audit emits about its model (``vitsem.audit.*``)."""

    name: str
    payload: dict[str, Any]


def audit_events(current: AuditRecord, previous: AuditRecord | None,
                 max_worst_group_drop: float = 0.05) -> list[AuditEvent]:
    """What changed for the worse since the previous audit of the same model: relied-on
    patterns that appeared (every one, on a first audit) and a worst-group accuracy that fell
    by more than ``max_worst_group_drop``."""
    events = []
    appeared = sorted(current.patterns - (previous.patterns if previous else frozenset()))
    if appeared:
        events.append(AuditEvent("vitsem.audit.pattern-appeared", {
            "patterns": appeared, "run_id": current.run_id,
            "previous_run_id": previous.run_id if previous else None}))
    new = current.get("worst_group_accuracy")
    old = previous.get("worst_group_accuracy") if previous else None
    if new is not None and old is not None and old - new > max_worst_group_drop:
        events.append(AuditEvent("vitsem.audit.worst-group-dropped", {
            "worst_group_accuracy": new, "previous": old, "drop": old - new,
            "run_id": current.run_id, "previous_run_id": previous.run_id if previous else None}))
    return events
