"""How our processes join Ray: the environment of a Ray we start, and one way to connect for every entry point."""

from __future__ import annotations

import logging
import os
from typing import Any

RAY_ENV_DEFAULTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "lacy.serve.proxy:middlewares"}
"""Environment every Ray process of a cluster we start inherits. Serve gives a starting HTTP proxy 5 s
to answer its readiness check (then restarts it, with linear backoff): on two loaded cores its start
alone took longer, and the experiment's requests failed. Its proxy wraps itself in
`lacy.serve.proxy.FinishResponses`, so a request whose replica dies gets 503 with Retry-After (or a
stream's error event), not a bare 500. cluster/env.sh exports the same for `ray start`."""


QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
"""Ray loggers silenced below ERROR in a Ray we start. Ray Train's placement-group cleaner asks the State
API, which the dashboard serves, whether the training controller lives; with the dashboard off (it costs
≈1 GiB) it warned once a second through every training run (357 lines in one `make run`)."""


def quiet_workers() -> None:
    """`worker_process_setup_hook` of a Ray we start (every worker process runs it first)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


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
            ray.init(include_dashboard=False, runtime_env={"worker_process_setup_hook": f"{__name__}.quiet_workers"})
    return ray
