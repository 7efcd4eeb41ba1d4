"""One MLflow parent run per multirun: ``fibo-run -m ...`` (any sweeper: Hydra's basic one, Optuna).

:class:`MlflowSweepParent` is a Hydra callback (``conf/hydra/default.yaml``: ``hydra.callbacks.mlflow_sweep``).
When a multirun starts it creates the parent run in the sweep's experiment and store (the ones the
jobs log to): run name ``sweep <time>``, params ``overrides`` (the command line's, sweep syntax
included), ``sweeper`` and ``jobs_planned`` (the basic sweeper's product of the swept values, the
Optuna sweeper's ``n_trials``), tags ``fibo.sweep=true``, ``fibo.sweep.dir`` (the sweep folder) and
``fibo.comparison=true`` (fibo-compare leaves it out of later comparisons, as its own runs). Its id
goes to the jobs through ``$FIBO_MLFLOW_PARENT_RUN_ID``: every new run a job starts is its child
(tag ``mlflow.parentRunId``, set in :func:`fibo.tracking.run_lifecycle`), so the UI nests them.

An Optuna sweep also logs ``search_space`` and ``direction`` (params) and, at the end, the sweeper's
``optimization_results.yaml`` (best params and value; artifact ``sweep/``).

When the multirun ends: param ``jobs`` (the children found), the sweep's ``fibo-compare`` table and
plot over the children (``comparison/comparison.{csv,md,png}``, headline metric ``result_metric.test``
or ``.fit``; written to ``<sweep dir>/comparison/``), then FINISHED. A failed job marks the parent
FAILED (Hydra stops the sweep after that job's batch, so the end is never reached; tags
``failed_jobs``, ``error``): at once, or, when the job left with ``SystemExit`` (fibo-run's bad-input
exit: Hydra never reports the job's end), when the process exits; a sweep stopped with Ctrl-C /
SIGTERM (a KILLED job run, or between jobs) leaves it KILLED; a sweeper that fails (Hydra prints its
error and exits 1) leaves it FAILED. A sweep that would launch no job (``hydra.sweeper.n_trials=0``)
stops with one line before the parent run exists.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fibo.tracking import PARENT_RUN_ENV as PARENT_ENV  # importing fibo.tracking loads neither MLflow nor Lightning

SWEEP_TAG = "fibo.sweep"
MINIMIZED = ("loss", "mse", "error", "nll", "perplexity")  # headline metrics that are better lower
log = logging.getLogger("fibo")
KILLED_EXIT_CODES = (130, 143)  # Ctrl-C, SIGTERM (fibo.tracking turns Lightning's SIGTERM into exit status 143)
_exit_code: list[Any] = []  # the exit status fibo-run's main() is leaving with (see note_exit)


def note_exit(code: Any) -> None:
    """Record the exit status the process leaves with (``fibo.cli.main`` calls it on ``SystemExit``):
    a sweep whose sweeper failed before or between jobs (Hydra prints the error, then exits 1) ends its
    parent run FAILED, not KILLED."""
    _exit_code[:] = [code]


def direction(test: Any, test_metric: str, fit_metric: str) -> str:
    """``minimize`` or ``maximize`` for the headline metric (``test_metric`` when ``test`` is true,
    else ``fit_metric``): names containing loss, mse, error, nll or perplexity are minimised. Registered as
    ``${fibo.direction:${test},${result_metric.test},${result_metric.fit}}`` (conf/hydra/sweeper/optuna_fibo.yaml)."""
    metric = str(test_metric if str(test).lower() in ("true", "1") else fit_metric).lower()
    return "minimize" if any(word in metric for word in MINIMIZED) else "maximize"


if not OmegaConf.has_resolver("fibo.direction"):
    OmegaConf.register_new_resolver("fibo.direction", direction)


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: Optuna's ``n_trials``, else the product of the swept
    values of the command line (Hydra's basic sweeper); None when it cannot tell (another sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if "optuna" in sweeper.lower():
        n = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
        return None if n is None else int(n)
    if not sweeper.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = OverridesParser.create().parse_overrides(list(OmegaConf.select(config, "hydra.overrides.task") or []))
    batches = BasicSweeper.split_arguments(overrides, None)
    return sum(len(b) for b in batches)


def headline_metric(config: DictConfig) -> str:
    """The metric fibo-run reports: ``result_metric.test`` after testing, else ``result_metric.fit``."""
    names = {"test": "test/acc1", "fit": "val/acc1", **(OmegaConf.to_container(config.get("result_metric") or {}))}
    return str(names["test" if config.get("test", True) else "fit"])


class MlflowSweepParent(Callback):
    """The parent MLflow run of a multirun (module docstring). Inert in single runs."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.client = None
        self.run_id: str | None = None
        self.experiment: str | None = None
        self.tracking_uri: str | None = None
        self.ended = False
        self.open_job: str | None = None  # the overrides of a job that started and has not ended

    # -- start ---------------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the parent run. A bad sweep (no job planned, an unreachable tracking server) stops
        the process with one line: Hydra turns a callback's exception into a warning and sweeps on."""
        from fibo.launch import INPUT_ERRORS
        from fibo.store import TrackingError

        if not self.enabled or os.environ.get(PARENT_ENV):  # a sweep inside a sweep's job: one parent
            return
        try:
            self._start(config)
        except (*INPUT_ERRORS, TrackingError) as err:
            print(f"fibo-run: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def _start(self, config: DictConfig) -> None:
        from mlflow.tracking import MlflowClient

        from fibo.store import check_tracking_server, prepare_store
        from fibo.tracking import resolve_tracking_uri

        log_cfg = config.logger
        uri = resolve_tracking_uri(log_cfg.get("tracking_uri"), log_cfg.get("default_store", "mlflow.db"))
        planned = planned_jobs(config)
        if planned is not None and planned < 1:
            from fibo.launch import UsageError

            raise UsageError(f"hydra.sweeper.n_trials={planned} runs no trial: pass hydra.sweeper.n_trials>=1, "
                             f"e.g. hydra.sweeper.n_trials=20")
        check_tracking_server(uri)
        prepare_store(uri)
        self.client, self.tracking_uri = MlflowClient(tracking_uri=uri), uri
        self.experiment = str(config.experiment_name)
        sweep_dir = str(Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).resolve())
        experiment_id = self._experiment_id(config, uri)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        run = self.client.create_run(experiment_id, run_name=f"sweep {time.strftime('%Y-%m-%d_%H-%M-%S')}", tags={
            SWEEP_TAG: "true", "fibo.comparison": "true", "fibo.sweep.dir": sweep_dir})
        self.run_id = run.info.run_id
        params = {"overrides": " ".join(overrides) or "-",
                  "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_", default="?")),
                  "jobs_planned": "?" if planned is None else str(planned)}
        search_space = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        if search_space is not None:  # Optuna: the search space and the direction of its study
            params["search_space"] = " ".join(f"{k}={v}" for k, v in search_space.items())
            params["direction"] = str(OmegaConf.select(config, "hydra.sweeper.direction"))
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value[:6000])
        os.environ[PARENT_ENV] = self.run_id
        atexit.register(self._end_at_exit)
        log.info("MLflow parent run %s for this sweep (%s jobs) in experiment %r", self.run_id,
                 params["jobs_planned"], self.experiment)

    def _experiment_id(self, config: DictConfig, uri: str) -> str:
        """The experiment the jobs log to, created as their logger creates it (same artifact location)."""
        from fibo.tracking import experiment_artifact_location

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = experiment_artifact_location(uri, config.logger.get("tracking_uri"),
                                                config.logger.get("default_artifact_location"))
        return self.client.create_experiment(self.experiment, artifact_location=location)

    # -- jobs ----------------------------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.open_job = " ".join(OmegaConf.select(config, "hydra.overrides.task") or []) or "-"

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        self.open_job = None
        if self.run_id is None or job_return is None or job_return.status != JobStatus.FAILED:
            return
        failed = int(self.client.get_run(self.run_id).data.tags.get("failed_jobs", "0")) + 1
        self.client.set_tag(self.run_id, "failed_jobs", str(failed))
        self.client.set_tag(self.run_id, "error", f"job {OmegaConf.select(config, 'hydra.job.num')} failed: "
                                                  f"{type(job_return._return_value).__name__}: {job_return._return_value}"[:5000])
        self._end_if_open("FAILED")

    # -- end -----------------------------------------------------------------------------------------
    def children(self) -> list:
        exp = self.client.get_experiment_by_name(self.experiment)
        ids = [exp.experiment_id] if exp is not None else []
        return self.client.search_runs(ids, filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
                                       max_results=10000) if ids else []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None or self.ended:
            return
        from fibo.compare import CompareError, compare

        try:
            self.client.log_param(self.run_id, "jobs", str(len(self.children())))
            out = Path(self.client.get_run(self.run_id).data.tags["fibo.sweep.dir"]) / "comparison"
            metric = headline_metric(config)
            try:
                result = compare([self.experiment], f"tags.`mlflow.parentRunId` = '{self.run_id}'", metric=metric,
                                 tracking_uri=self.tracking_uri, out_dir=out, log=False, quiet=True)
            except CompareError as err:
                log.warning("sweep comparison not made: %s", err)
                self.client.set_tag(self.run_id, "comparison_error", str(err)[:5000])
            else:
                self.client.log_param(self.run_id, "metric", metric)
                for path in result.files.values():
                    self.client.log_artifact(self.run_id, str(path), "comparison")
            optuna = out.parent / "optimization_results.yaml"  # the Optuna sweeper's best params and value
            if optuna.is_file():
                self.client.log_artifact(self.run_id, str(optuna), "sweep")
                print(f"fibo: sweep comparison ({metric}, {len(result.groups)} groups) logged to the parent MLflow "
                      f"run {self.run_id}: {out}", flush=True)
        except BaseException as err:
            self.client.set_tag(self.run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            self._end_if_open("FAILED")
            raise
        self._end_if_open("FINISHED")

    def _end_at_exit(self) -> None:
        """The process exits before the sweep ended. A job that started and never ended (fibo-run
        leaves a job that fails on bad input with SystemExit, which Hydra does not catch, so its
        on_job_end never comes), or a FAILED child run: FAILED; a KILLED child or none of this: KILLED."""
        if self.run_id is None or self.ended:
            return
        status = "KILLED"
        code = _exit_code[0] if _exit_code else None
        if code not in (None, 0, *KILLED_EXIT_CODES):  # the sweeper raised (its error is printed above)
            status = "FAILED"
            self._tag_quietly("error", f"the sweep stopped with exit status {code} (the sweeper's error is in the "
                                       f"console output and the sweep's log)")
        try:
            statuses = {r.info.run_name: r.info.status for r in self.children()}
            failed = [name for name, st in statuses.items() if st == "FAILED"]
            if "KILLED" not in statuses.values() and (failed or self.open_job is not None):
                status = "FAILED"
                what = [f"job run(s) {', '.join(failed)} FAILED"] if failed else []
                if self.open_job is not None:
                    what.append(f"the job with overrides {self.open_job} did not finish")
                self.client.set_tag(self.run_id, "failed_jobs", str(max(len(failed), 1)))
                self.client.set_tag(self.run_id, "error", "; ".join(what)[:5000])
        except Exception:  # noqa: BLE001 - the store may be gone at exit
            pass
        self._end_if_open(status)

    def _tag_quietly(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, value[:5000])
        except Exception:  # noqa: BLE001 - the store may be gone at exit
            pass

    def _end_if_open(self, status: str) -> None:
        if self.run_id is None or self.ended:
            return
        self.ended = True
        try:
            self.client.set_terminated(self.run_id, status)
        finally:
            if os.environ.get(PARENT_ENV) == self.run_id:
                os.environ.pop(PARENT_ENV, None)
