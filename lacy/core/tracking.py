"""MLflow helpers shared by every job: one absolute tracking URI, runs that carry their config.

MLflow is imported where a run is logged, never at import: a lent GPU box trains without it.

Experiments are marked as model-development ones (`mlflow.experimentKind`), runs sample system metrics, and
`ui_url` gives the link that opens the MLflow UI on an experiment's runs (MLflow 3.17's UI picks its GenAI or
Model-training view from a per-browser toggle unless the link names it: `workflowType=machine_learning`).

MLflow 3.17 refuses the file store and resolves relative URIs against the working directory, which
differs on Ray workers, so every URI handed out here is an absolute `sqlite:////...` (or a server URL),
and experiments get an absolute artifact location.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lacy.core.config import ConfigError, LacyConfig, to_dict
from lacy.core.provenance import git_sha

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"
EXPERIMENT_KIND = "custom_model_development"
"""The `mlflow.experimentKind` of our experiments: runs compared, not GenAI traces monitored."""


def _absolute(uri: str) -> str:
    """Make a sqlite URI or a bare `.db` path absolute; servers (http, databricks) pass through."""
    if uri.startswith(_SQLITE):
        path = uri[len(_SQLITE):]  # "/abs/x.db" for sqlite:////abs/x.db, "x.db" when relative
        return _SQLITE + str(Path(path).resolve())
    if "://" in uri or uri.startswith("databricks"):
        if uri.startswith("file:"):
            raise ConfigError(f"mlflow.tracking_uri: {uri!r} is a file store, which MLflow 3 refuses; "
                              "use sqlite:////abs/path/mlflow.db")
        return uri
    if uri.endswith(".db"):
        return _SQLITE + str(Path(uri).resolve())
    raise ConfigError(f"mlflow.tracking_uri: {uri!r} is neither a URI nor a .db path")


def tracking_uri(cfg: LacyConfig) -> str:
    """cfg.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite under run_dir; always absolute."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute(uri)
    path = Path(cfg.run_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return _SQLITE + str(path)


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (absolute file URI); a tracking server chooses its own."""
    if not uri.startswith(_SQLITE):
        return None
    return (Path(uri[len(_SQLITE):]).parent / "mlartifacts").as_uri()


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} with values as strings (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the URI, when a tracking server does not answer: MLflow's own client retries
    with back-off for minutes before it says anything."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ConfigError(f"mlflow.tracking_uri: the MLflow server at {uri} (mlflow.tracking_uri or "
                          f"$MLFLOW_TRACKING_URI) does not answer ({type(err).__name__}): start it "
                          "(cluster/mlflow_server.sh) or unset both to log to <run_dir>/mlflow.db") from None


def _experiment_id(name: str, uri: str) -> str:
    """The experiment `name` (created with an absolute artifact location if new), marked as ours."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=_artifact_location(uri),
                                     tags={"mlflow.experimentKind": EXPERIMENT_KIND})
        except MlflowException:  # another process created it between our lookup and create
            pass
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise MlflowException(f"could not create MLflow experiment {name!r} at {uri}")
    if "mlflow.experimentKind" not in experiment.tags:  # one made before we marked them
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    return experiment.experiment_id


def ui_url(uri: str, experiment_id: str) -> str:
    """Where the MLflow UI shows an experiment's runs: the server's URL, or for a sqlite store the address of
    `mlflow ui --backend-store-uri <uri>` (127.0.0.1:5000)."""
    root = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{root}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@contextmanager
def start_run(cfg: LacyConfig, run_name: str, nested: bool = False,
              parent_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run with the resolved config as flattened params and `config.yaml`, the git sha, and
    system metrics (CPU, memory, GPU where there is one) sampled while it runs.

    `parent_run_id` attaches the run to a parent started in another process (a Ray worker, a job);
    `nested` attaches it to the run active in this process.
    """
    if _mlflow() is None:  # a lent GPU box: the stage runs, unlogged
        log.warning("MLflow is not installed here: run %r is not logged", run_name)
        yield None
        return
    import mlflow

    uri = tracking_uri(cfg)
    _check_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(cfg.mlflow.experiment, uri)
    mlflow.set_experiment(experiment_id=experiment_id)  # what nested runs, traces and models log under
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, nested=nested,
                          parent_run_id=parent_run_id, log_system_metrics=cfg.mlflow.system_metrics) as run:
        config = to_dict(cfg)
        mlflow.log_params(flatten(config))
        sha = git_sha()
        if sha:
            mlflow.set_tag("git_sha", sha)
        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        yield run


def _mlflow() -> Any:
    """The mlflow module, or None where it is not installed."""
    try:
        import mlflow
    except ImportError:
        return None
    return mlflow


def active() -> Any:
    """The mlflow module when a run is active in this process (what the log_* helpers log to), else None:
    they never start a run of their own."""
    mlflow = _mlflow()
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (values are cast to float); nothing without one."""
    if (mlflow := active()) is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(local_dir: str, artifact_path: str | None = None) -> None:
    """Log a folder's files to the active run; nothing without one."""
    if (mlflow := active()) is not None:
        mlflow.log_artifacts(local_dir, artifact_path=artifact_path)


def log_dataset(name: str, source: str, digest: str, context: str) -> None:
    """Log a dataset (`source`: its path or name; `digest`: what identifies its content) as an input of the
    active run, under `context` (e.g. "training"); nothing without one."""
    if (mlflow := active()) is None:
        return
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.log_input(MetaDataset(resolve_dataset_source(source), name=name, digest=digest[:36]), context=context)
