"""What a user watching a stage sees: one logging format for every entry point, and progress bars.

Library modules log through `logging.getLogger(__name__)` and never print; entry points
(`python -m lacy.<stage>`, `python -m jobs.<stage>`) call `setup_logging()` once. Progress bars go to
stderr and switch themselves off when stderr is not a terminal (CI logs, Ray workers), unless
`LACY_PROGRESS=1` forces them on.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

T = TypeVar("T")


def setup_logging(level: int = logging.INFO) -> None:
    """`HH:MM:SS name: message` on stderr for lacy's loggers (idempotent)."""
    root = logging.getLogger("lacy")
    if not any(getattr(h, "_lacy", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._lacy = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # transformers' own bars ("Loading weights") would flood a log that shows ours.

    hf_logging.disable_progress_bar()
    # "__main__": a stage run as `python -m lacy.<stage>` logs under that name, not under "lacy".
    for name in ("jobs", "services", "__main__"):
        logging.getLogger(name).handlers = root.handlers
        logging.getLogger(name).setLevel(level)


def _enabled() -> bool:
    forced = os.environ.get("LACY_PROGRESS")
    return forced == "1" if forced is not None else sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar over `iterable` (or a manual one: `with progress(total=n) as bar: bar.update(k)`)."""
    return tqdm(iterable, disable=not _enabled(), dynamic_ncols=True, leave=False, **kwargs)


def tracked(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`iterable` with a progress bar (a generator, so it can wrap lazy streams)."""
    with progress(iterable, desc=desc, total=total, unit=unit) as bar:
        yield from bar
