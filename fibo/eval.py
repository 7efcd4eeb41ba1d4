"""``fibo-eval``: test a checkpoint written by ``fibo-run`` (lightning-hydra-template's ``eval.py``).

    fibo-eval ckpt_path=logs/runs/<run>/checkpoints/<best>.ckpt                 # the run's test split again
    fibo-eval ckpt_path=... data.split_seed=1                                   # other data: a child run
    fibo-eval ckpt_path=... data=imagefolder data.root=/data/digits-png ...     # another image dataset
    fibo-eval ckpt_path=... callbacks.rollout.num_episodes=100                  # robot: rollouts

Composed by Hydra from ``conf/eval.yaml`` (which is ``conf/config.yaml`` plus the options below), on
top of **the run's own overrides** (``<run dir>/.hydra/overrides.yaml`` beside ``checkpoints/``):
so ``fibo-eval ckpt_path=...`` alone rebuilds the run's data, model and attention, and an override on
the command line replaces the run's value (``data=...`` drops the run's ``data.*`` overrides too).

Image and video tasks test the checkpoint on ``eval_split`` (``test`` or ``val``) with Lightning's
``Trainer.test`` (weights, as fibo-run tests the best checkpoint: the same ``test/acc1`` exactly on
the same data). Robot tasks (no test split: the rollouts are the test) validate and run
``callbacks.rollout.num_episodes`` rollouts of the checkpoint's policy.

Where the results go (MLflow): into the checkpoint's run when the data are the run's (the same data
choice and data options, batch size and workers aside, and the same ``trainer.limit_test_batches`` /
``limit_val_batches``): metrics ``eval/<name>`` (``eval/test/acc1``),
tags ``eval.ckpt_path``, ``eval.split``; otherwise into a new child run of it (``mlflow.parentRunId``,
tag ``fibo.eval=true``, run name ``eval <run name> on <data>``) with the full config as params, the
evaluated split as a dataset input and the metrics under their own names (``test/acc1``). A checkpoint
without a run id (not written by fibo-run) gets a new top-level run.

Errors: no ``ckpt_path``; a missing file, a directory, a file that is not a Lightning checkpoint
(the messages of :func:`fibo.tracking.load_checkpoint`, as fibo-run); a run id that is not in the
store; other task/model/attention choices than the run's; weights that do not fit the configured
model: one line each, ``fibo-eval: error: ...``, exit status 1.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fibo.launch import CONF_DIR, UsageError, prepare_job  # also registers ${fibo.cwd:}, ${fibo.run_suffix:}

log = logging.getLogger("fibo")
SAME_DATA_IGNORED = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "data_dir")
SPLITS = ("test", "val")
EVAL_LIMITS = ("limit_test_batches", "limit_val_batches")  # trainer options that decide what is evaluated
NOTE_IGNORED = (*SAME_DATA_IGNORED, "default_root_dir")  # differ for every copied checkpoint: not worth a word


@dataclass
class Evaluation:
    """What :func:`evaluate` did: the ``metrics`` (without the ``eval/`` prefix), the MLflow run
    they went to (``run_id``; ``child`` when it is a new run) and the checkpoint's run (``source_run_id``)."""

    metrics: dict[str, float]
    run_id: str
    source_run_id: str | None
    child: bool
    tracking_uri: str
    headline: str
    logged: dict[str, float] = field(default_factory=dict)  # the metric names as logged


# -- the command line: the run's overrides first ------------------------------------------------------
def overrides_file(ckpt_path: str) -> Path:
    """``<ckpt dir>/../.hydra/overrides.yaml``: where the checkpoint's run folder keeps its overrides."""
    return Path(ckpt_path).expanduser().resolve().parent.parent / ".hydra" / "overrides.yaml"


def run_overrides(ckpt_path: str) -> list[str]:
    """The overrides the checkpoint's run was started with (:func:`overrides_file`; [] when there is
    none), without ``ckpt_path`` and ``hydra.*``."""
    file = overrides_file(ckpt_path)
    if not file.is_file():
        return []
    return [str(o) for o in OmegaConf.load(file) if not str(o).lstrip("+~").startswith(("ckpt_path=", "hydra.", "hydra/"))]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def merged_overrides(run: list[str], given: list[str]) -> list[str]:
    """``given`` (the command line), then ``run`` (the run's overrides) without what ``given`` sets;
    a ``data=`` on the command line also drops the run's ``data.*`` overrides (they were for its data)."""
    keys = {_key(o) for o in given if "=" in o and not o.startswith("-")}
    new_data = "data" in keys
    kept = [o for o in run if _key(o) not in keys and not (new_data and _key(o).startswith("data."))]
    return [*given, *kept]


def command_line(argv: list[str]) -> list[str]:
    """``argv`` (fibo-eval's arguments) and the run's overrides of its ``ckpt_path=`` (see
    :func:`merged_overrides`); unchanged without a ``ckpt_path=``."""
    ckpt = next((a.split("=", 1)[1] for a in argv if a.startswith("ckpt_path=")), None)
    if not ckpt:
        return argv
    return merged_overrides(run_overrides(ckpt), argv)


# -- the evaluation -------------------------------------------------------------------------------------
def same_data(run, cfg, choices) -> bool:
    """Whether ``cfg`` tests on the data the MLflow ``run`` was trained with: the same data choice and
    data options (batch size, workers and the data folder aside), and the same share of the split
    (``trainer.limit_test_batches`` / ``limit_val_batches``: a run tested on 2 batches is not the same
    test as the whole split)."""
    from fibo.tracking import changed_options

    if run.data.tags.get("choice.data") != str(choices.get("data")):
        return False
    changed = changed_options(run.data.params, cfg, groups=("data",))
    limits = [c for c in changed_options(run.data.params, cfg, groups=("trainer",), unset=True)
              if c.split(":", 1)[0].rsplit(".", 1)[-1] in EVAL_LIMITS]
    return not limits and not [c for c in changed if c.split(":", 1)[0].rsplit(".", 1)[-1] not in SAME_DATA_IGNORED]


def _source_run(client, run_id: str | None, cfg, choices, uri: str):
    from mlflow.exceptions import MlflowException

    from fibo.tracking import check_resume_matches

    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"ckpt_path={cfg.ckpt_path} belongs to MLflow run {run_id}, which is not in {uri}: set "
                         f"MLFLOW_TRACKING_URI (or logger.tracking_uri) to the store the run was trained with") from None
    try:
        check_resume_matches(run.data.tags, run_id, {**choices, "data": run.data.tags.get("choice.data")}, cfg.ckpt_path)
    except ValueError as err:
        raise ValueError(str(err).replace("this command", "fibo-eval").replace(
            "Resume with the run's overrides: fibo-run", "Evaluate with the run's choices: fibo-eval")) from None
    return run


def _test(built, cfg) -> dict[str, float]:
    split = str(cfg.eval_split)
    if split not in SPLITS:
        raise UsageError(f"eval_split={split} must be one of {list(SPLITS)}")
    trainer, task, datamodule = built.trainer, built.task, built.datamodule
    if split == "val":
        out = trainer.validate(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    else:
        out = trainer.test(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items()}


def _roll_out(built, cfg, ckpt: dict) -> dict[str, float]:
    """Robot: validation loss of the checkpoint, then ``num_episodes`` rollouts of its policy."""
    from fibo.envs.evaluation import RolloutEvaluation

    rollout = next(c for c in built.callbacks if isinstance(c, RolloutEvaluation))
    trainer, task = built.trainer, built.task
    out = trainer.validate(task, datamodule=built.datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    metrics = {k: float(v) for k, v in (out[0] if out else {}).items()}
    rollout.env = rollout.make_env(trainer, task)
    if rollout.env is None:
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: {rollout.refused}")
    try:
        record = rollout._roll_out(trainer, task, int(ckpt.get("epoch", 0)))
    finally:
        rollout._close()
    metrics.update({k: float(v) for k, v in record.items() if k.startswith("rollout/")})
    return metrics


def evaluate(cfg: DictConfig) -> Evaluation:
    """Test ``cfg.ckpt_path`` as configured and log the results (module docstring).

    Raises:
        UsageError: no ``ckpt_path``; a bad ``eval_split``.
        FileNotFoundError, IsADirectoryError, ValueError: see :func:`fibo.tracking.load_checkpoint`;
            a run id not in the store; other task/model/attention choices than the run's; weights
            that do not fit (:func:`fibo.tracking.check_checkpoint_fits`).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient

    from fibo.cli import _route_lightning_logs_through_hydra, build
    from fibo.tracking import (RUN_ID_KEY, changed_options, check_checkpoint_fits, check_tracking_server,
                               load_checkpoint, log_config, prepare_store, resolve_tracking_uri)

    if not cfg.get("ckpt_path"):
        raise UsageError("fibo-eval needs ckpt_path=<a .ckpt written by fibo-run>, e.g. "
                         "fibo-eval ckpt_path=logs/runs/<run>/checkpoints/last.ckpt")
    _route_lightning_logs_through_hydra()
    hydra_cfg = HydraConfig.get()
    choices = prepare_job(cfg, hydra_cfg, training=False)
    ckpt = load_checkpoint(cfg.ckpt_path)
    log_cfg = cfg.logger
    uri = resolve_tracking_uri(log_cfg.get("tracking_uri"), log_cfg.get("default_store", "mlflow.db"))
    check_tracking_server(uri)
    from fibo.store import sqlite_path

    db = sqlite_path(uri)
    if ckpt.get(RUN_ID_KEY) is not None and db is not None and not db.is_file():  # don't leave an empty store behind
        raise ValueError(f"ckpt_path={cfg.ckpt_path} belongs to MLflow run {ckpt[RUN_ID_KEY]}, which is not in {uri} "
                         f"(no store there): set MLFLOW_TRACKING_URI (or logger.tracking_uri) to the store the run "
                         f"was trained with")
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    source = _source_run(client, ckpt.get(RUN_ID_KEY), cfg, choices, uri)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        built = build(cfg, logger=False)
        changed = changed_options(source.data.params, cfg) if source is not None else None
        check_checkpoint_fits(ckpt, built.model, cfg.ckpt_path, changed)
        if source is not None and not overrides_file(cfg.ckpt_path).is_file():
            _note_copied_checkpoint(cfg, source)
        into_source = source is not None and same_data(source, cfg, choices)
        robot = any(type(c).__name__ == "RolloutEvaluation" for c in built.callbacks)
        names = {"test": "test/acc1", "fit": "val/acc1", **(cfg.get("result_metric") or {})}
        headline = names["fit"] if robot or str(cfg.eval_split) == "val" else names["test"]
        if into_source:
            metrics = _roll_out(built, cfg, ckpt) if robot else _test(built, cfg)
            logged = {f"eval/{k}": v for k, v in metrics.items()}
            _log_metrics(client, source.info.run_id, logged, int(ckpt.get("global_step", 0)))
            for key, value in {"eval.ckpt_path": str(Path(cfg.ckpt_path).resolve()),
                               "eval.split": "rollouts" if robot else str(cfg.eval_split)}.items():
                client.set_tag(source.info.run_id, key, value)
            return Evaluation(metrics, source.info.run_id, source.info.run_id, False, uri, headline, logged)
        experiment = client.get_experiment(source.info.experiment_id).name if source is not None else cfg.experiment_name
        tags = {"fibo.eval": "true", "fibo.eval.ckpt_path": str(Path(cfg.ckpt_path).resolve())}
        if source is not None:
            tags["mlflow.parentRunId"] = source.info.run_id
        name = f"eval {source.info.run_name if source is not None else Path(cfg.ckpt_path).stem} on {choices.get('data')}"
        logger = instantiate(cfg.logger, run_id=None, experiment_name=experiment, run_name=name, tags=tags)
        run_id = logger.run_id  # creates the run
        try:
            log_config(logger, cfg, choices, Path(hydra_cfg.runtime.output_dir))
            metrics = _roll_out(built, cfg, ckpt) if robot else _test(built, cfg)
            _log_metrics(client, run_id, metrics, int(ckpt.get("global_step", 0)))
            if not robot:
                from fibo.lineage import log_datasets

                log_datasets(client, run_id, built.datamodule, only=(str(cfg.eval_split),))
        except BaseException as err:
            client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return Evaluation(metrics, run_id, source.info.run_id if source is not None else None, True, uri, headline,
                          dict(metrics))
    finally:  # Lightning's logger sets the process's tracking URI: leave it as found
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


def _note_copied_checkpoint(cfg, source) -> None:
    """A checkpoint without its run folder (no ``.hydra/overrides.yaml`` beside ``checkpoints/``, e.g.
    copied elsewhere) is evaluated as the command line and the defaults configure it: name the options
    (data, model, attention, trainer) in which that differs from its run's, on stderr and in the log."""
    from fibo.tracking import changed_options

    differ = [c for c in changed_options(source.data.params, cfg, ("data", "model", "attention", "trainer"), unset=True)
              if c.split(":", 1)[0].rsplit(".", 1)[-1] not in NOTE_IGNORED]
    if differ:
        message = (f"fibo-eval: note: {cfg.ckpt_path} has no .hydra/overrides.yaml beside its folder, so this "
                   f"evaluation is configured by the command line and the defaults; it differs from run "
                   f"{source.info.run_id}'s config in: {'; '.join(differ)} (pass the run's overrides, MLflow "
                   f"artifact config/overrides.yaml, to evaluate as it did)")
        log.warning(message)
        print(message, file=sys.stderr, flush=True)


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _report(result: Evaluation) -> None:
    value = result.metrics.get(result.headline)
    where = (f"new child run {result.run_id} of run {result.source_run_id}" if result.child and result.source_run_id
             else f"new run {result.run_id}" if result.child else f"run {result.run_id} (as eval/...)")
    lines = ["", f"fibo-eval: {result.headline} = {value:.4f}" if value is not None else
             f"fibo-eval: no {result.headline} was computed ({', '.join(sorted(result.metrics)) or 'no metrics'})",
             f"  logged {len(result.logged)} metrics into MLflow {where}", f"  tracking URI: {result.tracking_uri}", ""]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    from fibo.cli import input_error

    try:
        result = evaluate(cfg)
    except Exception as err:  # noqa: BLE001 - sorted by input_error; the rest is re-raised as is
        message = input_error(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"fibo-eval: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    _report(result)
    value = result.metrics.get(result.headline)
    return None if value is None else float(value)


def main() -> None:
    """Console script ``fibo-eval``."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.argv = [sys.argv[0], *command_line(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
