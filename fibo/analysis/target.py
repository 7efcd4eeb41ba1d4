"""Where the analysis is logged: into the checkpoint's own MLflow run (status unchanged), or into a
new child run (tag ``mlflow.parentRunId``) when that run is gone from the store (deleted or
never there)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fibo")


@dataclass
class Target:
    """An MLflow run to log into: ``client`` (MlflowClient), ``run_id``, ``tracking_uri`` and
    whether it is a child run created here (``created``, ended by :meth:`close`)."""

    client: object
    run_id: str
    tracking_uri: str
    created: bool = False

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """All ``metrics`` at step 0, 1000 per request (MLflow's batch limit)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_dir(self, folder: Path, artifact_path: str = "analysis") -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.created:
            self.client.set_terminated(self.run_id, status)


def open_target(cfg, run_id: str, tracking_uri: str | None = None) -> Target:
    """The MLflow run ``run_id`` of the store the run config ``cfg`` logged to (``tracking_uri``
    overrides it; else ``cfg.logger.tracking_uri`` / ``$MLFLOW_TRACKING_URI`` / the run's SQLite
    store, as :func:`fibo.tracking.resolve_tracking_uri` resolves them), or a new child run of it
    in experiment ``cfg.experiment_name`` if the store no longer has it. A server is probed and a
    SQLite store prepared as ``fibo-run`` does (:func:`fibo.tracking.check_tracking_server`,
    :func:`fibo.tracking.prepare_store`).

    Raises:
        fibo.tracking.TrackingError: the server does not answer, or the store cannot be prepared.
    """
    import os

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fibo.tracking import check_tracking_server, prepare_store, resolve_tracking_uri

    logger_cfg = cfg.get("logger") or {}
    default_store = logger_cfg.get("default_store") or "mlflow.db"
    uri = resolve_tracking_uri(tracking_uri or logger_cfg.get("tracking_uri"), default_store)
    check_tracking_server(uri)
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        if client.get_run(run_id).info.lifecycle_stage != "deleted":
            return Target(client, run_id, uri)
    except MlflowException:
        pass
    name = cfg.get("experiment_name") or "fibo"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = logger_cfg.get("default_artifact_location")
        local = uri.startswith("sqlite:") and not tracking_uri and not logger_cfg.get("tracking_uri") \
            and not os.environ.get("MLFLOW_TRACKING_URI")
        experiment_id = client.create_experiment(name, artifact_location=Path(location).resolve().as_uri()
                                                 if local and location else None)
    else:
        experiment_id = experiment.experiment_id
    child = client.create_run(experiment_id, run_name=f"analysis-of-{run_id[:8]}",
                              tags={"mlflow.parentRunId": run_id, "fibo.analysis_of": run_id})
    log.warning("MLflow run %s is not in %s: logging the analysis into a new child run %s", run_id, uri,
                child.info.run_id)
    return Target(client, child.info.run_id, uri, created=True)
