"""A run kept in an object store: `run_dir: s3://bucket/prefix` (any `pyarrow.fs` URI).

Every stage works on local files, so a store-backed run has a node-local mirror, `<LACY_CACHE>/runs/
<hash of the URI>` (`LacyConfig.run_dir` then names it, `LacyConfig.store` the URI), and stages sync it
at their boundaries: `pull` what they read before they read it (another node may have written it),
`push` what they wrote. The store is the truth; a node with an empty mirror pulls what it needs, and a
re-run on a fresh machine finds every finished stage there. Ray Train writes its checkpoints straight
to the store (`storage_path`), so the mirror never holds them.

Syncs are incremental: `<mirror>/.lacy-sync.json` keeps, per file, the local (size, mtime) and the
store's (size, mtime) of the last transfer, and only files that changed on either side move. Deletions
are not mirrored (stages only write new content-addressed files or overwrite). Credentials and the
endpoint come from the usual AWS variables or the URI's query (`?endpoint_override=host:port&scheme=http`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lacy.core.config import LacyConfig

log = logging.getLogger(__name__)

SYNC_RECORD = ".lacy-sync.json"
CHUNK = 1 << 22
SKIPPED_DIRS = {"ray"}
"""Folders never mirrored: Ray Train's storage (checkpoints live in the store only)."""


@functools.lru_cache(maxsize=8)
def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a store URI."""

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds; name the URI
        raise ValueError(f"run_dir {uri!r}: not a storage URI pyarrow can open ({exc})") from exc
    return fs, path.rstrip("/")


class Mirror:
    """A store URI and its local mirror folder."""

    def __init__(self, uri: str, local: str | Path) -> None:
        self.uri, self.local = uri, Path(local)
        self.fs, self.root = filesystem(uri)

    def pull(self, *paths: str | Path) -> int:
        """Bring the store's files under `paths` (local paths inside the mirror; default all of it) into
        the mirror; returns how many files moved."""

        moved = 0
        with self._record() as record:
            for rel in self._rels(paths):
                info = self.fs.get_file_info(self._remote(rel))
                if info.type == pafs.FileType.File:
                    infos = [info]
                elif info.type == pafs.FileType.Directory:
                    infos = [i for i in self.fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                             if i.type == pafs.FileType.File]
                else:
                    continue
                for remote in infos:
                    name = remote.path[len(self.root) + 1:]
                    if self._skipped(name):
                        continue
                    local, seen = self.local / name, record.get(name)
                    theirs = [remote.size, remote.mtime_ns]
                    # Only what the store has anew: a local file changed since (not pushed yet) stays.
                    if local.is_file() and seen is not None and seen[2:] == theirs:
                        continue
                    local.parent.mkdir(parents=True, exist_ok=True)
                    tmp = local.with_name(f".{local.name}.{os.getpid()}.pull")
                    with self.fs.open_input_stream(remote.path) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    os.replace(tmp, local)
                    record[name] = _stat(local) + theirs
                    moved += 1
        if moved:
            log.info("pulled %d files from %s", moved, self.uri)
        return moved

    def push(self, *paths: str | Path) -> int:
        """Copy the mirror's files under `paths` (default all of it) that changed since their last
        transfer to the store; returns how many files moved."""
        moved = 0
        with self._record() as record:
            for rel in self._rels(paths):
                top = self.local / rel
                files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
                for local in files:
                    name = local.relative_to(self.local).as_posix()
                    if self._skipped(name) or (seen := record.get(name)) is not None and seen[:2] == _stat(local):
                        continue
                    remote = self._remote(name)
                    self.fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
                    with open(local, "rb") as src, self.fs.open_output_stream(remote) as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    info = self.fs.get_file_info(remote)
                    record[name] = _stat(local) + [info.size, info.mtime_ns]
                    moved += 1
        if moved:
            log.info("pushed %d files to %s", moved, self.uri)
        return moved

    def _rels(self, paths: tuple[str | Path, ...]) -> list[str]:
        rels = []
        for path in paths or (self.local,):
            path = Path(path)
            try:
                rels.append(path.relative_to(self.local).as_posix() if path.is_absolute() else path.as_posix())
            except ValueError:
                continue  # a path given explicitly outside the run (e.g. a tokenizer elsewhere): not the store's
        return ["" if r == "." else r for r in rels]

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    @staticmethod
    def _skipped(name: str) -> bool:
        parts = name.split("/")  # Ray Train's folders, and half-written files or folders (".x.tmp", ".x.pull")
        return any(p in SKIPPED_DIRS for p in parts[:-1]) or any(p.startswith(".") or p.endswith(".tmp") for p in parts)

    @contextlib.contextmanager
    def _record(self) -> Iterator[dict[str, list[int]]]:
        """The sync record, locked against the other processes of this node that sync the same mirror."""
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.local / ".lacy-sync.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.local / SYNC_RECORD
            record = json.loads(path.read_text()) if path.is_file() else {}
            try:
                yield record
            finally:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, path)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def pull(cfg: LacyConfig, *paths: str | Path) -> int:
    """`Mirror.pull` for a store-backed config (`cfg.store`); nothing to do for a local run."""
    return Mirror(cfg.store, cfg.run_dir).pull(*paths) if cfg.store else 0


def push(cfg: LacyConfig, *paths: str | Path) -> int:
    """`Mirror.push` for a store-backed config (`cfg.store`); nothing to do for a local run."""
    return Mirror(cfg.store, cfg.run_dir).push(*paths) if cfg.store else 0


def ray_storage(cfg: LacyConfig, local: str | Path) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: the store's counterpart of the
    local folder `local` for a store-backed run, else the folder itself."""
    if not cfg.store:
        return str(local), None
    fs, root = filesystem(cfg.store)
    rel = Path(local).relative_to(cfg.run_dir).as_posix()
    return f"{root}/{rel}", fs
