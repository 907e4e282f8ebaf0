"""Housekeeping after crashes: runs left ``running`` by a dead process, and the temporary
files a killed write leaves (``vitsem db housekeeping``; the crash reaper also runs when a
flow run starts)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from vitsem.platform.runs import STALE_AFTER_SECONDS, reap_crashed_runs
from vitsem.platform.settings import Settings

log = logging.getLogger("vitsem.platform.housekeeping")

TEMP_MAX_AGE_SECONDS = 3600.0
"""A temporary file or folder older than this belongs to no live write."""

TEMP_FILE_PATTERNS = (".tmp-*", "*.tmp")
"""Temporary names of atomic writes: the local artifact store's ``.tmp-XXXX`` files,
``<name>.tmp`` of checkpoints and Parquet files being written."""

TEMP_DIR_PATTERNS = ("vitsem-analysis-*", "vitsem-audit-*")
"""Scratch folders of report writing under the system's temporary folder."""


@dataclass
class Housekeeping:
    crashed_runs: list[int] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def _old(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except OSError:
        return False


def sweep_temporary_files(settings: Settings, older_than: float = TEMP_MAX_AGE_SECONDS,
                          now: float | None = None) -> list[Path]:
    """Remove temporary files of writes that never finished (older than ``older_than``
    seconds) under the home folder and a local artifact store, and old report scratch
    folders; returns what was removed. Never follows links."""
    cutoff = (now or time.time()) - older_than
    roots = [settings.home.resolve()]
    uri = settings.resolved_artifact_uri()
    if urlparse(uri).scheme in ("", "file"):
        store = Path(urlparse(uri).path).resolve()
        if not store.is_relative_to(roots[0]):
            roots.append(store)
    removed: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for pattern in TEMP_FILE_PATTERNS:
            for p in root.rglob(pattern):
                if p.is_file() and not p.is_symlink() and _old(p, cutoff):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    scratch = Path(tempfile.gettempdir())
    for pattern in TEMP_DIR_PATTERNS:
        for d in scratch.glob(pattern):
            if d.is_dir() and not d.is_symlink() and _old(d, cutoff):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    for p in removed:
        log.info("removed stale temporary %s", p)
    return removed


def housekeeping(settings: Settings, stale_after: float = STALE_AFTER_SECONDS,
                 older_than: float = TEMP_MAX_AGE_SECONDS) -> Housekeeping:
    """Close crashed runs (:func:`~vitsem.platform.runs.reap_crashed_runs`) and sweep stale
    temporary files (:func:`sweep_temporary_files`)."""
    return Housekeeping(reap_crashed_runs(settings, stale_after),
                        sweep_temporary_files(settings, older_than))
