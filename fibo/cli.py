"""``fibo-run``: the Hydra entry point. Composes ``conf/``, then builds and runs everything.

Data flows one way: config -> datamodule and model (+ task) -> Lightning Trainer -> MLflow.
Heavy imports happen inside :func:`build` and :func:`train` so that ``fibo-run --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

import hydra
from omegaconf import DictConfig

from fibo.launch import CONF_DIR, INPUT_ERRORS, UsageError, job_argv_for_ddp_children, prepare_job  # also registers ${fibo.cwd:}, ${fibo.run_suffix:}
from fibo.sweep import direction as _direction  # noqa: F401 - registers ${fibo.direction:} (conf/hydra/sweeper/optuna_fibo.yaml)

log = logging.getLogger("fibo")


def _route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own console handler; Hydra already logs to console and <run dir>/*.log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True


@dataclass
class Built:
    """What :func:`build` instantiates from a config."""

    datamodule: Any
    model: Any
    task: Any
    callbacks: list
    trainer: Any
    metrics: dict = field(default_factory=dict)  # model/params, attention/density: logged at the start
    tags: dict = field(default_factory=dict)  # the model's run_tags() (e.g. model.pretrained_resized): set at the start


def build_modules(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """``(datamodule, model, task)``: ``cfg.data``, ``cfg.model`` and ``cfg.task`` (around the model)
    instantiated, without trainer, logger or callbacks (``fibo-analyze`` builds a run this way: a run's
    trainer config, GPUs or DDP, need not fit the analysing machine)."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    return datamodule, model, instantiate(cfg.task, model=model)


def build(cfg: DictConfig, logger: Any = None) -> Built:
    """Instantiate ``cfg.data``, ``cfg.model``, ``cfg.task`` (around the model), ``cfg.callbacks``
    (plus the run-id-in-checkpoint callback) and ``cfg.trainer`` (with ``logger``: a Lightning
    logger, or ``False`` for none; ``None`` instantiates ``cfg.logger``). Seeds first (``cfg.seed``)."""
    import lightning as L
    from hydra.utils import instantiate

    from fibo.callbacks import RunIdInCheckpoint

    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, task = build_modules(cfg)
    metrics = {"model/params": float(sum(p.numel() for p in model.parameters()))}
    if hasattr(model, "attention_density"):
        metrics.update({f"attention/{k}": v for k, v in model.attention_density().items()})
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(RunIdInCheckpoint())
    if logger is None:
        logger = instantiate(cfg.logger)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    tags = dict(model.run_tags()) if hasattr(model, "run_tags") else {}
    return Built(datamodule, model, task, callbacks, trainer, metrics, tags)


def train(cfg: DictConfig) -> float | None:
    """Train (and test) one configuration. Returns the headline metric (``result_metric.test`` after
    testing, else ``result_metric.fit``: ``test/acc1`` / ``val/acc1`` unless the task says otherwise).

    The MLflow run (:func:`fibo.tracking.run_lifecycle`) spans everything from the composed config
    on: a crash in building, training or testing ends it FAILED (KILLED on Ctrl-C / SIGTERM).
    """
    from hydra.core.hydra_config import HydraConfig

    from fibo.tracking import run_lifecycle

    _route_lightning_logs_through_hydra()
    hydra_cfg = HydraConfig.get()
    choices = prepare_job(cfg, hydra_cfg)
    names = {"test": "test/acc1", "fit": "val/acc1", **(cfg.get("result_metric") or {})}
    with run_lifecycle(cfg, choices, hydra_cfg.runtime.output_dir) as run, job_argv_for_ddp_children(hydra_cfg):
        built = build(cfg, logger=run.logger)
        run.datamodule = built.datamodule
        run.logger.log_metrics(built.metrics)
        for key, value in built.tags.items():
            run.logger.experiment.set_tag(run.run_id, key, value)
        trainer, task = built.trainer, built.task
        trainer.fit(task, datamodule=built.datamodule, ckpt_path=cfg.ckpt_path)
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        result = fit_result(trainer, names["fit"])
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.test:
            tested = trainer.test(task, datamodule=built.datamodule, ckpt_path=best or None, weights_only=False)
            result = tested[0].get(names["test"]) if tested else None
            if tested and trainer.fast_dev_run:  # Lightning logs nothing under fast_dev_run: keep what is printed
                run.logger.log_metrics({k: float(v) for k, v in tested[0].items()})
        if run.rank_zero and cfg.logger.get("mlflow_model", True):
            from fibo.logged_model import log_best_model

            log_best_model(run.run_id, task, built.datamodule, best, step=trainer.global_step)  # never raises
    if run.rank_zero:
        _report(cfg, run, choices, built.metrics, result, names["test" if cfg.test else "fit"])
    return None if result is None else float(result)


def fit_result(trainer, name: str):
    """``name`` after fitting: the latest record of a callback that keeps ``results`` (the rollout
    evaluation), else what the task logged (``trainer.callback_metrics``); None if neither has it."""
    for callback in trainer.callbacks:
        records = [r for r in getattr(callback, "results", None) or () if isinstance(r, dict) and name in r]
        if records:
            return records[-1][name]
    return trainer.callback_metrics.get(name)


def _report(cfg: DictConfig, run, choices: dict, metrics: dict, result, name: str) -> None:
    density = metrics.get("attention/density")
    lines = [
        "",
        f"fibo: {name} = {float(result):.4f}" if result is not None else f"fibo: no {name} was computed",
        f"  task={choices.get('task')} data={choices.get('data')} model={choices.get('model')} "
        f"attention={choices.get('attention')} seed={cfg.seed}"
        + (f" (attention density {100 * density:.2f}% incl. CLS)" if density is not None else ""),
        f"  MLflow run {run.run_id} ({cfg.run_name}) in experiment '{cfg.experiment_name}'",
        f"  tracking URI: {run.tracking_uri}",
        f"  browse: mlflow ui --backend-store-uri {shlex.quote(run.tracking_uri)}",
        "",
    ]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except Exception as err:  # noqa: BLE001 - sorted by input_error; the rest is re-raised as is
        message = input_error(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"fibo-run: error: {message}\n  (the MLflow run, if one started, is FAILED with this error; "
              f"HYDRA_FULL_ERROR=1 shows the traceback)" if not isinstance(err, UsageError) else
              f"fibo-run: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def input_error(err: BaseException) -> str | None:
    """The one-line message of a bad-input error (also when Hydra's ``instantiate`` wraps it), else
    None (a bug: its traceback is shown)."""
    from hydra.errors import InstantiationException

    from fibo.store import TrackingError

    cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
    if isinstance(cause, (*INPUT_ERRORS, TrackingError)) and str(cause).strip():
        return str(cause).strip().splitlines()[0] if isinstance(cause, UsageError) else " ".join(str(cause).split())
    return None


def main() -> None:
    """Console script ``fibo-run``."""
    from fibo.sweep import note_exit

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        _hydra_main()
    except SystemExit as exit_:  # Hydra exits 1 after printing an error it caught (e.g. the sweeper's)
        note_exit(exit_.code)
        raise


if __name__ == "__main__":
    sys.exit(main())
