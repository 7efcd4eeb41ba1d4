"""MLflow tracking: where runs go, what is logged with them, and how they end.

A run starts and ends in :func:`run_lifecycle` (a context manager that ``fibo.cli.train`` enters):
resume check -> MLflow run RUNNING (new, or the checkpoint's run resumed) -> config, tags, git ->
the body (build, fit, test) -> the data report -> FINISHED, FAILED (``error`` tag) or KILLED
(Ctrl-C / SIGTERM: exit status 143 and a resume hint). A run that had FINISHED stays FINISHED when a
later attempt on it fails (the attempt's error goes to the ``failed_attempt`` tag).

Importing this module imports neither Lightning nor MLflow (they load when a run starts), so that
the checks before a run (:func:`check_tracking_server`, :func:`load_checkpoint`) answer within
seconds; the callback that writes the run id into checkpoints is
:class:`fibo.callbacks.RunIdInCheckpoint`.

Default store: ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (MLflow 3
refuses the plain file store). ``MLFLOW_TRACKING_URI`` (e.g. a server) overrides it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibo.store import TrackingError, check_tracking_server, prepare_store  # noqa: F401 - re-exported

RUN_ID_KEY = "fibo_mlflow_run_id"
PARENT_RUN_ENV = "FIBO_MLFLOW_PARENT_RUN_ID"  # set by fibo.sweep.MlflowSweepParent for the jobs of a multirun
RESUME_GROUPS = ("task", "data", "model", "attention")
PARAM_LIMIT = 250  # characters of a param value that Lightning's MLFlowLogger.log_hyperparams keeps
log = logging.getLogger("fibo")


def resolve_tracking_uri(tracking_uri: str | None, default_store: str) -> str:
    """``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<default_store>``.
    A relative ``sqlite:///rel.db`` is taken against the launch directory
    (:func:`fibo.launch.launch_dir`), also when ``hydra.job.chdir=true`` moved the working directory."""
    from fibo.launch import launch_dir
    from fibo.store import absolute_sqlite_uri

    given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        return absolute_sqlite_uri(given, launch_dir())
    Path(default_store).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(default_store).resolve()}"


#: seconds between MLflow system-metrics samples when the logger config does not say (SystemMetrics).
SYSTEM_METRICS_INTERVAL_S = 10.0


def mlflow_logger(
    experiment_name: str = "fibo",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    default_store: str = "mlflow.db",
    default_artifact_location: str | None = "mlartifacts",
    log_model: bool = True,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics_interval: float = SYSTEM_METRICS_INTERVAL_S,
    mlflow_model: bool = True,
) -> MLFlowLogger:
    """Lightning's :class:`MLFlowLogger` on the resolved store. ``run_id`` continues an existing run
    (resuming from a checkpoint). Artifacts of the default SQLite store go to
    ``default_artifact_location``; a server or another URI decides its own artifact root.
    ``system_metrics_interval`` (seconds; 0 = off) is read by :func:`run_lifecycle`, which samples
    MLflow's system metrics (:class:`SystemMetrics`). ``mlflow_model`` is read by ``fibo.cli.train``:
    the best checkpoint's network logged as an MLflow model (:func:`fibo.logged_model.log_best_model`)."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = resolve_tracking_uri(tracking_uri, default_store)
    artifact_location = experiment_artifact_location(uri, tracking_uri, default_artifact_location)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri,
                        artifact_location=artifact_location, log_model=log_model, run_id=run_id,
                        tags=dict(tags or {}))


def experiment_artifact_location(uri: str, tracking_uri: str | None, default_artifact_location: str | None) -> str | None:
    """Where a new experiment of the default SQLite store keeps its artifacts (a ``file://`` URI of
    ``default_artifact_location``); None (the server's or MLflow's own choice) for a configured or
    ``$MLFLOW_TRACKING_URI`` store."""
    if uri.startswith("sqlite:") and default_artifact_location and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        return Path(default_artifact_location).resolve().as_uri()
    return None


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


def end_run(logger: MLFlowLogger, status: str, error: BaseException | None = None) -> None:
    """Terminate the run with MLflow ``status`` (FINISHED, FAILED, KILLED), recording the error."""
    client, run_id = logger.experiment, logger.run_id
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, status)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a/b/c": str(value)}`` (the keys MLflow params get; lists stay one value)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}/"))
        else:
            flat[name] = str(value)
    return flat


def load_checkpoint(ckpt_path: str | None) -> dict | None:
    """The checkpoint a ``ckpt_path`` resumes from, loaded on the CPU (None without one); its
    ``RUN_ID_KEY`` entry is the MLflow run it continues (absent for a foreign checkpoint).

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist. IsADirectoryError: it is a directory (the
            message lists the .ckpt files inside).
        ValueError: ``torch.load`` cannot read it, or it is not a Lightning checkpoint.
    """
    import torch

    if ckpt_path is None:
        return None
    ckpt = Path(ckpt_path).expanduser()
    if ckpt.is_dir():
        inside = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.ckpt"))[:5]
        raise IsADirectoryError(f"ckpt_path={ckpt_path} is a directory: pass the .ckpt file"
                                + (f" (it holds {', '.join(inside)})" if inside else " (it holds no .ckpt file)"))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist: pass the path of a .ckpt file "
                                f"(runs keep theirs in <run dir>/checkpoints/last.ckpt)")
    try:
        loaded = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for non-checkpoints
        raise ValueError(f"ckpt_path={ckpt_path} is not a Lightning checkpoint that torch.load can read "
                         f"({type(err).__name__}: {err}); pass a .ckpt written by fibo-run") from None
    if not isinstance(loaded, dict) or "state_dict" not in loaded or "pytorch-lightning_version" not in loaded:
        what = f"a {type(loaded).__name__}" + (f" with keys {sorted(map(str, loaded))[:5]}" if isinstance(loaded, dict) else "")
        raise ValueError(f"ckpt_path={ckpt_path} holds {what}, not a Lightning checkpoint (state_dict, "
                         f"pytorch-lightning_version); pass a .ckpt written by fibo-run")
    return loaded


def changed_options(params: Mapping[str, str], cfg, groups: tuple[str, ...] = ("data", "model", "attention"),
                    unset: bool = False) -> list[str]:
    """``"data.img_size: 16 -> 32"`` for every option of ``groups`` whose value in ``cfg`` differs from
    the MLflow ``params`` a run was started with (compared as they were stored: ``PARAM_LIMIT`` characters);
    ``unset``: also the run's options that ``cfg`` lacks (``"trainer.limit_test_batches: 1 -> unset"``,
    a ``+key=`` override of the run)."""
    from omegaconf import OmegaConf

    flat = flatten_params({g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups if g in cfg})
    changed = [f"{k.replace('/', '.')}: {params[k]} -> {v}" for k, v in flat.items()
               if k in params and params[k][:PARAM_LIMIT] != v[:PARAM_LIMIT]]
    if unset:
        changed += [f"{k.replace('/', '.')}: {v} -> unset" for k, v in params.items()
                    if k.split("/", 1)[0] in groups and "/" in k and k not in flat]
    return changed


def check_checkpoint_fits(ckpt: Mapping[str, Any], model, ckpt_path: str, changed: list[str] | None = None) -> None:
    """Refuse to resume from a checkpoint whose ``model.*`` weights (the task's ``state_dict``) do
    not have the shapes of ``model`` as configured now, before any run is touched (Lightning would
    stop later with a raw "size mismatch").

    Raises:
        ValueError: one line naming the first mismatching parameter, both shapes and the options
            that changed since the run (``changed``, from :func:`changed_options`) or the likely ones.
    """
    state = ckpt.get("state_dict") or {}
    mine = model.state_dict()
    for key, value in state.items():
        name = key[len("model."):] if key.startswith("model.") else None
        if name in mine and hasattr(value, "shape") and tuple(value.shape) != tuple(mine[name].shape):
            why = ("options changed since the run: " + "; ".join(changed)) if changed else \
                "likely changed: an option that sets the model's sizes (data.img_size, model.patch_size, " \
                "data.num_classes, model.*)"
            raise ValueError(f"ckpt_path={ckpt_path} does not fit the model as configured: {name} is "
                             f"{list(value.shape)} in the checkpoint but {list(mine[name].shape)} now ({why}); "
                             f"resume with the run's options, or start a new run without ckpt_path")


def check_resume_matches(tags: Mapping[str, str], run_id: str, choices: Mapping[str, Any], ckpt_path: str) -> None:
    """Refuse to resume ``run_id`` (whose MLflow ``tags`` are given) with other config-group choices
    (task, data, model, attention) than it was started with: that would load a mismatched checkpoint
    and rewrite the run.

    Raises:
        ValueError: naming the differing groups and the overrides to resume with.
    """
    differ = [g for g in RESUME_GROUPS if f"choice.{g}" in tags and tags[f"choice.{g}"] != str(choices.get(g))]
    if differ:
        was = " ".join(f"{g}={tags[f'choice.{g}']}" for g in RESUME_GROUPS if f"choice.{g}" in tags)
        now = ", ".join(f"{g}={choices.get(g)} (was {tags[f'choice.{g}']})" for g in differ)
        raise ValueError(f"ckpt_path={ckpt_path} belongs to MLflow run {run_id}, started with {was}; this command "
                         f"has {now}. Resume with the run's overrides: fibo-run {was} <its other overrides> "
                         f"ckpt_path={ckpt_path}")


def log_config(logger: MLFlowLogger, cfg, choices: Mapping[str, Any], output_dir: Path) -> None:
    """The resolved config as params and ``config/config.yaml`` (+ Hydra's ``overrides.yaml``), the
    ``choice.*``, ``output_dir``, ``seed`` tags and the git commit. A resumed run keeps its params
    (MLflow params are immutable): changed values go to the ``resumed_with_changes`` tag. Values
    longer than ``PARAM_LIMIT`` characters are cut (by Lightning's logger) and named in the
    ``params_truncated`` tag and a warning."""
    from omegaconf import OmegaConf

    client, run_id = logger.experiment, logger.run_id
    flat = flatten_params(OmegaConf.to_container(cfg, resolve=True))
    existing = client.get_run(run_id).data.params
    if existing:
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k][:PARAM_LIMIT] != v[:PARAM_LIMIT]}
        if changed:
            client.set_tag(run_id, "resumed_with_changes",
                           "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())[:5000])
        flat = {k: v for k, v in flat.items() if k not in existing}
    if flat:
        logger.log_hyperparams(flat)  # Lightning's MLFlowLogger cuts values to PARAM_LIMIT characters
        cut = sorted(k for k, v in flat.items() if len(v) > PARAM_LIMIT)
        if cut:
            log.warning("MLflow params cut to %d characters: %s (full values: config/config.yaml)", PARAM_LIMIT, ", ".join(cut))
            client.set_tag(run_id, "params_truncated", f"{', '.join(cut)} (cut to {PARAM_LIMIT} characters; "
                                                       f"full values: config/config.yaml)"[:5000])
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    overrides = Path(output_dir) / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        client.log_artifact(run_id, str(overrides), "config")
    commit, dirty = git_commit(Path(__file__).resolve().parent)  # the code that ran
    tags = {f"choice.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")}
    tags.update({"output_dir": str(output_dir), "seed": str(cfg.seed)})
    if commit:
        tags.update({"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()})
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_data_report(logger: MLFlowLogger, datamodule) -> None:
    """What ``datamodule.report()`` (a :class:`fibo.data.report.DataReport`) returns: its metrics as
    MLflow metrics, its texts as artifacts. Never raises: reporting must not hide the run's outcome."""
    if datamodule is None:
        return
    try:
        if not hasattr(datamodule, "report"):
            return
        report = datamodule.report()
        metrics, texts = dict(report.metrics), dict(report.texts)
        if metrics:
            logger.log_metrics({k: float(v) for k, v in metrics.items()})
        for path, text in texts.items():
            logger.experiment.log_text(logger.run_id, text, path)
    except Exception as err:  # noqa: BLE001
        log.warning("could not log the data report: %s", err)


class SystemMetrics:
    """MLflow's own system-metrics sampler (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, disk, network and, where pynvml finds a GPU,
    ``system/gpu_*``) on one run: every ``interval`` seconds from :meth:`start`, and one last sample at
    :meth:`stop`, so that a run shorter than the interval still has its row in the UI's system-metrics
    tab. Source: ``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`` (psutil,
    nvidia-ml-py). ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides ``interval`` as in MLflow."""

    def __init__(self, run_id: str, tracking_uri: str, interval: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri,
                                            resume_logging=True)

    def start(self) -> None:
        self.monitor.start()

    @staticmethod
    def interval_of(logger_cfg: Mapping[str, Any]) -> float:
        """``logger.system_metrics_interval`` in seconds (0 or null = off), defaulting as
        :func:`mlflow_logger` does, which takes the key so that every instantiation of the logger
        config accepts it."""
        value = logger_cfg.get("system_metrics_interval", SYSTEM_METRICS_INTERVAL_S)
        return float(value or 0)

    def stop(self) -> None:
        """Stops the sampler and logs one final sample (the run must still be active)."""
        try:
            self.monitor.finish()
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - system metrics never fail a run
            log.warning("system metrics: the last sample was not logged (%s)", err)


@dataclass
class Run:
    """The run :func:`run_lifecycle` yields: its ``logger`` (Lightning's MLFlowLogger, to hand to the
    Trainer), ``run_id``, ``tracking_uri``, whether this process owns it (``rank_zero``), and the
    ``datamodule`` whose report is logged when the run ends (set it once built)."""

    logger: MLFlowLogger
    tracking_uri: str
    rank_zero: bool = True
    datamodule: Any = None
    resumed_status: str | None = None
    system_metrics: SystemMetrics | None = None

    @property
    def run_id(self) -> str:
        return self.logger.run_id


@contextmanager
def run_lifecycle(cfg, choices: Mapping[str, Any], output_dir: str | Path) -> Iterator[Run]:
    """One MLflow run around the body of a ``with`` block.

    Before anything is touched: ``cfg.ckpt_path`` is loaded (:func:`load_checkpoint`), an MLflow
    server is probed (:func:`fibo.store.check_tracking_server`), a SQLite store created or migrated
    once under a lock (:func:`fibo.store.prepare_store`); a resumed run's task/data/model/attention choices are compared
    (:func:`check_resume_matches`) and the checkpoint's weights with the model as configured
    (:func:`check_checkpoint_fits`). Then the run is RUNNING (a resumed run drops the stopped
    attempt's ``error`` tag), the config logged (:func:`log_config`). On leaving: the data report
    (:func:`log_data_report`) and the data's splits as MLflow dataset inputs
    (:func:`fibo.lineage.log_datasets`), then FINISHED; FAILED with the ``error`` tag for an exception; KILLED
    for Ctrl-C / SIGTERM (``SystemExit`` without a code becomes ``SystemExit(143)``) with a resume
    hint on stderr. A run that was FINISHED before this attempt stays FINISHED (the attempt's error:
    tag ``failed_attempt``). Under DDP/FSDP only global rank zero changes the run
    (:func:`is_global_zero_process`).
    """
    from hydra.utils import instantiate

    ckpt = load_checkpoint(cfg.ckpt_path)
    log_cfg = cfg.logger
    uri = resolve_tracking_uri(log_cfg.get("tracking_uri"), log_cfg.get("default_store", "mlflow.db"))
    check_tracking_server(uri)
    prepare_store(uri)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")  # mlflow.set_tracking_uri (Lightning calls it) sets it
    try:
        with _run(cfg, choices, output_dir, ckpt, uri, instantiate) as run:
            yield run
    finally:  # leave the process as found: a later run in this process resolves its own store
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


def _check_resume(cfg, choices, ckpt, client, run_id, instantiate):
    """The resume checks that read but never change the run; returns it (None: a new run)."""
    previous = client.get_run(run_id) if run_id is not None else None
    if previous is not None:
        check_resume_matches(previous.data.tags, run_id, choices, cfg.ckpt_path)
    if ckpt is not None:
        try:
            model = instantiate(cfg.model)
        except Exception as err:  # noqa: BLE001 - the body builds it again and fails inside the run
            log.debug("resume shape check skipped: the model could not be built here (%s)", err)
        else:
            changed = changed_options(previous.data.params, cfg) if previous is not None else None
            check_checkpoint_fits(ckpt, model, cfg.ckpt_path, changed)
    return previous


def _hydra_job_num() -> str | None:
    """This multirun job's number (``hydra.job.num``), None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    num = HydraConfig.get().job.get("num")
    return None if num is None else str(num)


def _sigterm_as_exit(signum, frame) -> None:
    """SIGTERM while no one else handles it (building, generating demos, testing: outside Lightning's
    fit, whose own handler is installed over this one and stops training gracefully): ``SystemExit(143)``,
    so that the run ends KILLED instead of the process dying with the run left RUNNING."""
    import signal

    if signal.getsignal(signal.SIGTERM) is _sigterm_as_exit:
        raise SystemExit(143)


@contextmanager
def _sigterm_handled() -> Iterator[None]:
    """:func:`_sigterm_as_exit` as the SIGTERM handler (main thread, default handler only) while inside."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _sigterm_as_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _run(cfg, choices, output_dir, ckpt, uri, instantiate) -> Iterator[Run]:
    run_id = ckpt.get(RUN_ID_KEY) if ckpt is not None else None
    logger = instantiate(cfg.logger, run_id=run_id)
    run = Run(logger=logger, tracking_uri=uri, rank_zero=is_global_zero_process())
    if run.rank_zero:
        from mlflow.tracking import MlflowClient

        previous = _check_resume(cfg, choices, ckpt, MlflowClient(tracking_uri=uri), run_id, instantiate)
        client = logger.experiment  # creates the run unless it resumes one
        parent = os.environ.get(PARENT_RUN_ENV)  # a multirun's parent run (fibo.sweep.MlflowSweepParent)
        if previous is None and parent and parent != run.run_id:
            client.set_tag(run.run_id, "mlflow.parentRunId", parent)
            job = _hydra_job_num()
            if job is not None:  # which job of the sweep (an Optuna trial's number)
                client.set_tag(run.run_id, "fibo.sweep.job", job)
        if previous is not None:
            run.resumed_status = previous.info.status
            client.update_run(run_id, status="RUNNING")
            if "error" in previous.data.tags:  # the stopped attempt's error no longer applies
                client.delete_tag(run_id, "error")
        interval = SystemMetrics.interval_of(cfg.logger)
        if interval > 0:
            run.system_metrics = SystemMetrics(run.run_id, uri, interval)
            run.system_metrics.start()
    try:
        if run.rank_zero:  # inside try: a config that fails to resolve here still ends the run FAILED
            log_config(logger, cfg, choices, Path(output_dir))
        with _sigterm_handled():
            yield run
    except (KeyboardInterrupt, SystemExit) as err:
        if run.rank_zero:
            _end(run, "KILLED", err)
            last = Path(output_dir) / "checkpoints" / "last.ckpt"
            print(f"\nfibo: run {run.run_id} was stopped ({type(err).__name__}) and is marked KILLED in MLflow"
                  + (f"; resume it with: fibo-run <same overrides> ckpt_path={last}" if last.is_file() else ""),
                  file=sys.stderr, flush=True)
        if isinstance(err, SystemExit) and not err.code:  # Lightning's SIGTERMException has no code
            raise SystemExit(143) from err
        raise
    except BaseException as err:
        if run.rank_zero:
            _end(run, "FAILED", err)
        raise
    if run.rank_zero:
        _end(run, "FINISHED")


def _end(run: Run, status: str, error: BaseException | None = None) -> None:
    if run.system_metrics is not None:
        run.system_metrics.stop()
    log_data_report(run.logger, run.datamodule)
    from fibo.lineage import log_datasets

    log_datasets(run.logger.experiment, run.run_id, run.datamodule)  # never raises
    if error is not None and run.resumed_status == "FINISHED":  # never un-finish a finished run
        run.logger.experiment.set_tag(run.run_id, "failed_attempt", f"{type(error).__name__}: {error}"[:5000])
        run.logger.experiment.set_terminated(run.run_id, "FINISHED")
        return
    end_run(run.logger, status, error)
