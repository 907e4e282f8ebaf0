"""Headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it): a page rendered the way
a person's browser renders it, read back as its DOM or a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1800")
"""The closed network refuses Chromium's background connections; these flags stop them."""


def chromium() -> str:
    """The browser; on CI its absence fails the test instead of skipping it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def render(url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The DOM of ``url`` after its scripts ran (``budget_ms`` of virtual time); with
    ``screenshot``, the page is also saved as a PNG there."""
    with tempfile.TemporaryDirectory(prefix="vitsem-chromium-") as profile:
        args = [chromium(), *FLAGS, f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True,
                             timeout=180, check=True).stdout
        if screenshot is not None:
            subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True,
                           timeout=180, check=True)
    return dom
