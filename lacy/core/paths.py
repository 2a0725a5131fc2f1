"""Where things live: the repository, ../shared, and the user cache that survives fresh clones."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """`$LACY_SHARED`, else the `shared/` folder beside the checkout."""
    return Path(os.environ.get("LACY_SHARED", REPO_ROOT.parent / "shared")).resolve()


def wiki2015_dir() -> Path:
    return shared_dir() / "data" / "wiki2015"


def cache_dir() -> Path:
    """`$LACY_CACHE`, else ~/.cache/lacy: converted models and compiled ops, kept across clones."""
    path = Path(os.environ.get("LACY_CACHE", Path.home() / ".cache" / "lacy"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones resolve against `$LACY_RUN_ROOT`, else the working directory."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return (Path(os.environ.get("LACY_RUN_ROOT", os.getcwd())) / path).resolve()
