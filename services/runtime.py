"""How our processes join Ray: the environment of a Ray we start, and one way to connect for every entry point."""

from __future__ import annotations

import os
from typing import Any

RAY_ENV_DEFAULTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "lacy.serve.proxy:middlewares"}
"""Environment every Ray process of a cluster we start inherits. Serve gives a starting HTTP proxy 5 s
to answer its readiness check (then restarts it, with linear backoff): on two loaded cores its start
alone took longer, and the experiment's requests failed. Its proxy wraps itself in
`lacy.serve.proxy.FinishResponses`, so a request whose replica dies gets 503 with Retry-After (or a
stream's error event), not a bare 500. cluster/env.sh exports the same for `ray start`."""


def init_ray() -> Any:
    """Connect to the cluster named by RAY_ADDRESS, else reuse an initialised Ray, else start one (its
    processes inherit RAY_ENV_DEFAULTS, unless already set)."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto")
        else:
            for name, value in RAY_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
            ray.init(include_dashboard=False)
    return ray
