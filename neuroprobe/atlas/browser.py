"""Headless Chromium for looking at the atlas the way a reader does (tests, screenshots, load timing).

Uses the system's ``chromium`` (Debian package ``chromium``) with networking off;
nothing is downloaded.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from neuroprobe.errors import NeuroprobeError

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """Path of a Chromium executable, or ``None``."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(url: str, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise NeuroprobeError("no chromium found (Debian: apt-get install chromium).")
    with tempfile.TemporaryDirectory(prefix="np-chromium-") as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True,
                              timeout=timeout, check=False)


def url_of(path: str | Path) -> str:
    """``file://`` URL of a local page (URLs pass through)."""
    p = str(path)
    return p if "://" in p else Path(p).resolve().as_uri()


def dump_dom(page: str | Path, *, timeout: float = 90, budget_ms: int = 5000) -> str:
    """The page's DOM after its scripts ran (what a reader sees), as HTML."""
    res = _run(url_of(page), ["--dump-dom", f"--virtual-time-budget={budget_ms}"], timeout)
    if res.returncode != 0 or not res.stdout.strip():
        raise NeuroprobeError(f"chromium could not render {page} (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    return res.stdout


def screenshot(page: str | Path, png: str | Path, *, width: int = 1280, height: int = 1600, timeout: float = 90) -> Path:
    """A PNG of the page as rendered at ``width`` x ``height`` pixels."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    res = _run(url_of(page), [f"--screenshot={png.resolve()}", f"--window-size={width},{height}", "--virtual-time-budget=5000"],
               timeout)
    if not png.exists():
        raise NeuroprobeError(f"chromium wrote no screenshot of {page} (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    return png
