"""``fibo-run``: the Hydra entry point. Composes ``conf/``, then builds and runs everything.

Data flows one way: config -> datamodule and model (+ task) -> Lightning Trainer -> MLflow.
Heavy imports happen inside :func:`build` and :func:`train` so that ``fibo-run --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("fibo")

PATH_KEYS = ("root", "path", "ckpt_path")  # and keys ending in _dir, _path, _file, _list, _root
PATH_SUFFIXES = ("_dir", "_path", "_file", "_list", "_root")
RUN_SUFFIX = secrets.token_hex(3)  # one per process: a sweep's jobs share it, DDP children get the run dir


def launch_dir() -> str:
    """The directory fibo-run was started in (Hydra's ``runtime.cwd``), whatever Hydra's working
    directory is now (``hydra.job.chdir=true`` moves it into the run folder); before Hydra has a
    config (while it sets up a sweep's folder) the working directory, which is still the launch one."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = OmegaConf.select(HydraConfig.get(), "runtime.cwd")
        if cwd:
            return str(cwd)
    return os.getcwd()


# ${fibo.cwd:} = the launch directory (see launch_dir); ${fibo.run_suffix:} = a random 6-hex suffix that
# keeps two runs started in the same second out of each other's folders (conf/hydra/default.yaml).
for _name, _resolver in (("fibo.cwd", launch_dir), ("fibo.run_suffix", lambda: RUN_SUFFIX)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def check_run_options(cfg: DictConfig) -> None:
    """``seed`` an integer, ``experiment_name`` not empty.

    Raises:
        ValueError: one line naming the option and what it takes.
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed={cfg.seed!r} is not an integer: pass seed=<int>, e.g. seed=0")
    if not str(cfg.experiment_name or "").strip():
        raise ValueError(f"experiment_name={cfg.experiment_name!r} is empty: pass an MLflow experiment name, "
                         f"e.g. experiment_name=fibo")


def check_overrides(overrides: list[str], conf_dir: str = CONF_DIR) -> None:
    """Refuse a dot-override that sets a config group's name to a string (``model.attention=dense``):
    Hydra accepts it and the run fails later with an unrelated error; the group is chosen without the
    dot. Generic: any ``a.b.<group>=<string>`` where ``conf/<group>/`` is a config group.

    Raises:
        ValueError: naming the override and the group choice to write instead.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        group = key.rsplit(".", 1)[-1]
        if "." not in key or key.startswith("hydra.") or not isinstance(value, str) or value.startswith("${"):
            continue
        options = sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))
        if options:
            choice = f"{group}={value}" if value in options else f"{group}=<{'|'.join(options)}>"
            raise ValueError(f"{override.input_line} sets {key} to the string {value!r}, but {group} is a config "
                             f"group: choose it with {choice} (no dot)")


def absolute_cli_paths(cfg: DictConfig, overrides: list[str], cwd: str) -> None:
    """Make the relative paths given on the command line (keys named ``root``, ``path``, ``ckpt_path``
    or ending in ``_dir``/``_path``/``_file``/``_list``/``_root``) absolute against the launch
    directory ``cwd``, so that they mean the same whatever Hydra's working directory is
    (``hydra.job.chdir=true``). Changes ``cfg`` in place."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key, value = override.key_or_group, override.value()
        name = key.rsplit(".", 1)[-1]
        if key.startswith("hydra.") or not isinstance(value, str) or not value or "://" in value \
                or not (name in PATH_KEYS or name.endswith(PATH_SUFFIXES)):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and OmegaConf.select(cfg, key) == value:
            OmegaConf.update(cfg, key, str(Path(cwd) / path), force_add=False)


NAMED_GROUPS = ("model", "attention", "data", "seed")  # always in the default run name


def _default_run_name(cfg: DictConfig, choices: dict, swept: list[str] = ()) -> str:
    """``<model>-<attention>-<data>-s<seed>``, then this job's values of what else a sweep varies."""
    base = f"{choices.get('model')}-{choices.get('attention')}-{choices.get('data')}-s{cfg.seed}"
    return "-".join([base, *swept])


def swept_overrides(job_overrides: list[str], argv: list[str]) -> list[str]:
    """This job's values (``task.lr=0.01``) of the overrides that the command line ``argv`` sweeps
    (``task.lr=0.01,0.1``), other than model, attention, data and seed (the default name has them).
    Empty when ``argv`` sweeps nothing or cannot be parsed (a job launched by a remote launcher)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        swept = {o.key_or_group for o in parser.parse_overrides([a for a in argv if not a.startswith("-")])
                 if o.is_sweep_override()}
        jobs = parser.parse_overrides(job_overrides)
    except Exception:  # noqa: BLE001 - Hydra's parser raises its own types
        return []
    return [o.input_line for o in jobs if o.key_or_group in swept and o.key_or_group not in NAMED_GROUPS]


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


def build(cfg: DictConfig, logger: Any = None) -> Built:
    """Instantiate ``cfg.data``, ``cfg.model``, ``cfg.task`` (around the model), ``cfg.callbacks``
    (plus the run-id-in-checkpoint callback) and ``cfg.trainer`` (with ``logger``: a Lightning
    logger, or ``False`` for none; ``None`` instantiates ``cfg.logger``). Seeds first (``cfg.seed``)."""
    import lightning as L
    from hydra.utils import instantiate

    from fibo.callbacks import RunIdInCheckpoint

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model)
    metrics = {"model/params": float(sum(p.numel() for p in model.parameters()))}
    if hasattr(model, "attention_density"):
        metrics.update({f"attention/{k}": v for k, v in model.attention_density().items()})
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(RunIdInCheckpoint())
    if logger is None:
        logger = instantiate(cfg.logger)
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    return Built(datamodule, model, task, callbacks, trainer, metrics)


def train(cfg: DictConfig) -> float | None:
    """Train (and test) one configuration. Returns the headline metric (``result_metric.test`` after
    testing, else ``result_metric.fit``: ``test/acc1`` / ``val/acc1`` unless the task says otherwise).

    The MLflow run (:func:`fibo.tracking.run_lifecycle`) spans everything from the composed config
    on: a crash in building, training or testing ends it FAILED (KILLED on Ctrl-C / SIGTERM).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fibo.tracking import run_lifecycle

    _route_lightning_logs_through_hydra()
    hydra_cfg = HydraConfig.get()
    runtime = hydra_cfg.runtime
    check_overrides(list(hydra_cfg.overrides.task))
    check_run_options(cfg)
    absolute_cli_paths(cfg, list(hydra_cfg.overrides.task), runtime.cwd)
    choices = dict(runtime.choices)
    if cfg.run_name is None:
        swept = swept_overrides(list(hydra_cfg.overrides.task), sys.argv[1:]) if hydra_cfg.mode == RunMode.MULTIRUN else []
        cfg.run_name = _default_run_name(cfg, choices, swept)
    names = {"test": "test/acc1", "fit": "val/acc1", **(cfg.get("result_metric") or {})}
    with run_lifecycle(cfg, choices, runtime.output_dir) as run, job_argv_for_ddp_children(hydra_cfg):
        built = build(cfg, logger=run.logger)
        run.datamodule = built.datamodule
        run.logger.log_metrics(built.metrics)
        trainer, task = built.trainer, built.task
        trainer.fit(task, datamodule=built.datamodule, ckpt_path=cfg.ckpt_path)
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        result = fit_result(trainer, names["fit"])
        if cfg.test:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            tested = trainer.test(task, datamodule=built.datamodule, ckpt_path=best or None, weights_only=False)
            result = tested[0].get(names["test"]) if tested else None
            if tested and trainer.fast_dev_run:  # Lightning logs nothing under fast_dev_run: keep what is printed
                run.logger.log_metrics({k: float(v) for k, v in tested[0].items()})
    if run.rank_zero:
        _report(cfg, run, choices, built.metrics, result, names["test" if cfg.test else "fit"])
    return None if result is None else float(result)


@contextmanager
def job_argv_for_ddp_children(hydra_cfg) -> Iterator[None]:
    """Inside a multirun job, make the processes that Lightning's DDP launcher starts run this job
    only: Lightning builds their command from ``sys.argv`` (which holds the whole sweep, ``-m``
    included, so every child re-ran the sweep into a new ``logs/multiruns/`` folder) plus
    ``hydra.run.dir=<HydraConfig run.dir>`` (not the job's folder). For the job, ``sys.argv`` is the
    job's own overrides and ``run.dir`` its output folder; both are restored after it. There is no
    public Lightning API for the child command (``_hydra_subprocess_cmd``, Lightning 2.6)."""
    from hydra.types import RunMode
    from omegaconf import read_write

    if hydra_cfg.mode != RunMode.MULTIRUN:
        yield
        return
    argv, run_dir = sys.argv, hydra_cfg.run.dir
    sys.argv = [argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = run_dir


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
    return train(cfg)


def main() -> None:
    """Console script ``fibo-run``."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
