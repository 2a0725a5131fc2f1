"""Where things live: the repository, ../shared, the user cache that survives fresh clones, and store URIs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


def is_uri(path: str | Path) -> bool:
    """`scheme://...` other than a local `file://` path."""
    scheme = urlsplit(str(path)).scheme
    return "://" in str(path) and len(scheme) > 1 and scheme != "file"


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path (the query, e.g. an endpoint, stays at the end)."""
    s = urlsplit(uri)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, ""))


def mirror_dir(uri: str) -> Path:
    """The node-local mirror of a store URI: the same path on every node with the same LACY_CACHE."""
    s = urlsplit(uri)
    name = hashlib.sha256(f"{s.scheme}://{s.netloc}{s.path.rstrip('/')}".encode()).hexdigest()[:16]
    return cache_dir() / "runs" / name
