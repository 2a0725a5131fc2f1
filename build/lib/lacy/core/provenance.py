"""What produced a result: the commit, the machine and its load, so a figure can be traced and compared.

CPU models differ between our 2-core machines (AMD EPYC, Intel Xeon) and so do their float results and
speeds: every published result names the machine it came from.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from lacy.core.paths import REPO_ROOT


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha() -> str | None:
    """The checkout's commit, or None outside a git checkout (e.g. a `ray job submit` working dir)."""
    return _git("rev-parse", "HEAD") or None


def git_describe() -> str:
    """The commit, short, with "+changes" when the working tree differs from it ("unknown" outside git)."""
    sha = _git("rev-parse", "--short=10", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("+changes" if _git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    """CPU model, cores, AVX2 / AVX-512, torch version and load average: what a figure was measured on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    field = lambda name: next((line.split(":", 1)[1] for line in lines if line.startswith(name)), "")  # noqa: E731
    flags = field("flags").split()
    return {"cpu": field("model name").strip() or platform.processor(), "cores": os.cpu_count(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "torch": torch.__version__,
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
