"""Headless Chromium for the tests that check rendered pages (the report, the manual)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dump_dom(page: Path, tmp: Path, budget_ms: int = 5000) -> str:
    """The DOM of ``page`` after Chromium has loaded it (scripts run, images decoded)."""
    chromium = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    assert chromium, (
        "chromium is required for this test (apt-get install chromium; scripts/install.sh does it)"
    )
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chrome'}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
