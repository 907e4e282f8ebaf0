"""Content digests: one way to name a set of parameters or inputs, shared by every layer."""

from __future__ import annotations

import hashlib
import json
from typing import Any

DIGEST_LENGTH = 16
"""Hex characters of a parameter digest (64 bits): enough to tell parameter sets apart; the
content itself is addressed by its full sha256."""


def json_digest(obj: Any, length: int = DIGEST_LENGTH) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``), cut to
    ``length`` hex characters."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    """Full hex sha256 of ``data``: the address of stored content."""
    return hashlib.sha256(data).hexdigest()
