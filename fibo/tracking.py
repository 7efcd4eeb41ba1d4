"""MLflow tracking: where runs go, what is logged with them, and how they end.

Default store: ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (MLflow 3
refuses the plain file store). ``MLFLOW_TRACKING_URI`` (e.g. a server) overrides it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

RUN_ID_KEY = "fibo_mlflow_run_id"


def resolve_tracking_uri(tracking_uri: str | None, default_store: str) -> str:
    """``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<default_store>``."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    Path(default_store).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(default_store).resolve()}"


def mlflow_logger(
    experiment_name: str = "fibo",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    default_store: str = "mlflow.db",
    default_artifact_location: str | None = "mlartifacts",
    log_model: bool = True,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> MLFlowLogger:
    """Lightning's :class:`MLFlowLogger` on the resolved store. ``run_id`` continues an existing run
    (resuming from a checkpoint). Artifacts of the default SQLite store go to
    ``default_artifact_location``; a server or another URI decides its own artifact root."""
    uri = resolve_tracking_uri(tracking_uri, default_store)
    artifact_location = None
    if uri.startswith("sqlite:") and default_artifact_location and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        artifact_location = Path(default_artifact_location).resolve().as_uri()
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                        artifact_location=artifact_location, log_model=log_model, run_id=run_id,
                        tags=dict(tags or {}))


def is_global_zero_process() -> bool:
    """Whether this process owns the MLflow run (creates it, logs the config, ends it). Usable before
    the Trainer exists: reads the variables that process launchers set. Lightning's DDP launcher sets
    ``LOCAL_RANK`` (and ``NODE_RANK`` across nodes) for the processes it starts, torchrun sets ``RANK``,
    SLURM sets ``SLURM_PROCID``; a process without any of them (a plain run, ddp_spawn's main
    process) is rank zero."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return True


def git_commit(path: str | Path) -> tuple[str | None, bool]:
    """``(commit, dirty)`` of the git checkout holding ``path``; outside git ``($FIBO_GIT_COMMIT, False)``
    (the Docker image records the commit it was built from there), else ``(None, False)``."""
    fallback = os.environ.get("FIBO_GIT_COMMIT") or None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return fallback, False
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return fallback, False


def run_id_in_checkpoint(ckpt_path: str | Path) -> str | None:
    """The MLflow run id a fibo checkpoint was written under (None for foreign checkpoints)."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return ckpt.get(RUN_ID_KEY) if isinstance(ckpt, dict) else None


class RunIdInCheckpoint(L.Callback):
    """Stores the MLflow run id in every checkpoint so that ``fibo-run ckpt_path=...`` continues
    the same run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            checkpoint[RUN_ID_KEY] = logger.run_id


def end_run(logger: MLFlowLogger, status: str, error: BaseException | None = None) -> None:
    """Terminate the run with MLflow ``status`` (FINISHED, FAILED, KILLED), recording the error."""
    client, run_id = logger.experiment, logger.run_id
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, status)
