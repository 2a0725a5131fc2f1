"""The capacity sweep on Ray: `lacy.sweep` with every point's experiment on `jobs.experiment`'s backend
(Ray Data, Ray Train + DeepSpeed, the cascade behind Serve, whose batched big-model calls evaluate
several requests at once where one process decodes them in turn).

    python -m jobs.sweep --config configs/synthbio-sweep.yaml --people 40,100,1000
"""

from __future__ import annotations

from typing import Any

from jobs.experiment import RayBackend
from lacy import sweep


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:

    return sweep.main(argv, RayBackend())


if __name__ == "__main__":
    main()
