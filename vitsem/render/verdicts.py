"""One vocabulary for what the audit concluded about a candidate, used by every surface (the
console, the Prefect markdown, the HTML report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERDICTS: dict[str, str] = {
    "shortcut": "shortcut",
    "object": "relied on, on the object",
    "unconfirmed": "not confirmed",
}
"""Verdict key -> the words every surface shows."""


def verdict(finding: Mapping[str, Any]) -> str:
    """The verdict key of a finding summary (``confirmed``, ``shortcut`` flags)."""
    if finding.get("shortcut"):
        return "shortcut"
    return "object" if finding.get("confirmed") else "unconfirmed"


def verdict_label(finding: Mapping[str, Any]) -> str:
    return VERDICTS[verdict(finding)]
