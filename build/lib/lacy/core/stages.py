"""Content-addressed stage records: a stage whose outputs exist for the same inputs is skipped.

Every stage of the experiment writes `<folder>/stage.json` = {"key": hash of what determines its
output, **what later stages need}. A re-run with the same key reuses the folder; any other key redoes
the stage. Written atomically, so a crash loses only the stage in flight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lacy.core.config import config_hash

RECORD = "stage.json"


def stage_done(directory: str | Path, key: str) -> dict | None:
    """The record of a finished stage with this key, else None."""
    path = Path(directory) / RECORD
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return record
    return None


def stage_finish(directory: str | Path, key: str, **record: Any) -> dict:
    """Write the record of a finished stage (atomically); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"key": key, **record}
    tmp = directory / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, directory / RECORD)
    return record


def cached_value(path: str | Path, key_payload: Any) -> dict | None:
    """The value stored at `path` under the hash of `key_payload`, else None."""
    path = Path(path)
    if path.is_file() and (value := json.loads(path.read_text())).get("key") == config_hash(key_payload):
        return value
    return None


def cached_json(path: str | Path, key_payload: Any, compute: Callable[[], dict]) -> dict:
    """`compute()`, stored at `path` under the hash of `key_payload`, or the stored value for that key."""
    path, key = Path(path), config_hash(key_payload)
    if (value := cached_value(path, key_payload)) is not None:
        return value
    value = {**compute(), "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value
