"""``fibo-run``: the Hydra entry point. Composes ``conf/``, then builds and runs everything.

Data flows one way: config -> datamodule and model (+ task) -> Lightning Trainer -> MLflow.
Heavy imports happen inside :func:`train` so that ``fibo-run --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("fibo")

# ${fibo.cwd:} = the directory fibo-run was started in; unlike ${hydra:runtime.cwd} it also resolves
# while Hydra sets up a sweep (hydra.sweep.dir), before any job runs.
if not OmegaConf.has_resolver("fibo.cwd"):
    OmegaConf.register_new_resolver("fibo.cwd", os.getcwd)


def _default_run_name(cfg: DictConfig, choices: dict) -> str:
    return f"{choices.get('model')}-{choices.get('attention')}-{choices.get('data')}-s{cfg.seed}"


def _log_config(logger, cfg: DictConfig, choices: dict, output_dir: Path) -> None:
    from fibo.tracking import git_commit

    client, run_id = logger.experiment, logger.run_id
    params = OmegaConf.to_container(cfg, resolve=True)
    existing = client.get_run(run_id).data.params
    if existing:  # a resumed run: MLflow params are immutable, so record what changed as a tag
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        flat = {k: str(v) for k, v in _flatten_dict(_convert_params(params)).items()}
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k][:250] != v[:250]}
        if changed:
            client.set_tag(run_id, "resumed_with_changes", "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())[:5000])
        params = {k: v for k, v in flat.items() if k not in existing}
    if params:
        logger.log_hyperparams(params)
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    overrides = output_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        client.log_artifact(run_id, str(overrides), "config")
    commit, dirty = git_commit(Path(__file__).resolve().parent)  # the code that ran
    tags = {f"choice.{k}": str(v) for k, v in choices.items() if not k.startswith("hydra")}
    tags.update({"output_dir": str(output_dir), "seed": str(cfg.seed)})
    if commit:
        tags.update({"mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()})
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _route_lightning_logs_through_hydra() -> None:
    """Lightning adds its own console handler; Hydra already logs to console and <run dir>/*.log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True


def train(cfg: DictConfig) -> float | None:
    """Train (and test) one configuration. Returns ``test/acc1`` (or the last ``val/acc1``; another
    metric where ``result_metric`` names one).

    Every run is an MLflow run from the moment its config is composed: a crash in data loading,
    model building, training or testing ends it FAILED (KILLED on Ctrl-C) with the error as a tag;
    checkpoints and logs already written stay.
    """
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from fibo.tracking import RunIdInCheckpoint, end_run, is_global_zero_process, run_id_in_checkpoint

    _route_lightning_logs_through_hydra()
    hydra_cfg = HydraConfig.get()
    choices = dict(hydra_cfg.runtime.choices)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.run_name is None:
        cfg.run_name = _default_run_name(cfg, choices)

    run_id = None
    if cfg.ckpt_path is not None:
        ckpt = Path(cfg.ckpt_path).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist: pass the path of a .ckpt file "
                                    f"(runs keep theirs in <run dir>/checkpoints/last.ckpt)")
        try:
            run_id = run_id_in_checkpoint(ckpt)
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for non-checkpoints
            raise ValueError(f"ckpt_path={cfg.ckpt_path} is not a Lightning checkpoint that torch.load can read "
                             f"({type(err).__name__}: {err}); pass a .ckpt written by fibo-run") from None

    logger = instantiate(cfg.logger, run_id=run_id)
    # Multi-process training (DDP/FSDP): every process runs this function, only global rank zero owns
    # the MLflow run (Lightning's logger itself writes from rank zero only).
    rank_zero = is_global_zero_process()
    if rank_zero and run_id is not None:
        _check_resume_matches(logger, run_id, choices, cfg.ckpt_path)
        logger.experiment.update_run(run_id, status="RUNNING")
        if "error" in logger.experiment.get_run(run_id).data.tags:  # the stopped attempt's error no longer applies
            logger.experiment.delete_tag(run_id, "error")
    try:
        if rank_zero:  # inside try: a config that fails to resolve here still ends the run FAILED
            _log_config(logger, cfg, choices, output_dir)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model)
        task = instantiate(cfg.task, model=model)
        metrics = {"model/params": float(sum(p.numel() for p in model.parameters()))}
        if hasattr(model, "attention_density"):
            metrics.update({f"attention/{k}": v for k, v in model.attention_density().items()})
        logger.log_metrics(metrics)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        callbacks.append(RunIdInCheckpoint())
        trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if trainer.interrupted:
            raise KeyboardInterrupt("training was interrupted")
        result = trainer.callback_metrics.get(_result_name(cfg))
        if cfg.test:
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
            tested = trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
            result = tested[0].get(_result_name(cfg)) if tested else None
    except (KeyboardInterrupt, SystemExit) as err:
        if rank_zero:
            _log_data_report(logger, locals().get("datamodule"))
            end_run(logger, "KILLED", err)
            last = output_dir / "checkpoints" / "last.ckpt"
            print(f"\nfibo: run {logger.run_id} was stopped ({type(err).__name__}) and is marked KILLED in MLflow"
                  + (f"; resume it with: fibo-run <same overrides> ckpt_path={last}" if last.is_file() else ""),
                  file=sys.stderr, flush=True)
        if isinstance(err, SystemExit) and not err.code:  # Lightning's SIGTERMException has no code
            raise SystemExit(143) from err
        raise
    except BaseException as err:
        if rank_zero:
            _log_data_report(logger, locals().get("datamodule"))
            end_run(logger, "FAILED", err)
        raise
    if rank_zero:
        _log_data_report(logger, datamodule)
        end_run(logger, "FINISHED")
        _report(cfg, logger, choices, metrics, result)
    return None if result is None else float(result)


def _log_data_report(logger, datamodule) -> None:
    """Counts a DataModule reports (e.g. videos left out as unusable) as metrics, and the list of
    skipped files as an artifact."""
    if datamodule is None or not hasattr(datamodule, "data_report"):
        return
    try:
        logger.log_metrics({k: float(v) for k, v in datamodule.data_report().items()})
        skipped = getattr(datamodule, "skipped_videos", None)
        if skipped:
            text = "".join(f"{path}\t{reason}\n" for path, reason in skipped)
            logger.experiment.log_text(logger.run_id, text, "data/skipped_videos.tsv")
    except Exception as err:  # noqa: BLE001 - reporting must never hide the run's own outcome
        log.warning("could not log the data report: %s", err)


def _check_resume_matches(logger, run_id: str, choices: dict, ckpt_path: str) -> None:
    """Refuse to resume ``run_id`` with other config-group choices (task, data, model, attention)
    than the run was started with: that would load a mismatched checkpoint and rewrite the run."""
    tags = logger.experiment.get_run(run_id).data.tags
    groups = ("task", "data", "model", "attention")
    differ = [g for g in groups if f"choice.{g}" in tags and tags[f"choice.{g}"] != str(choices.get(g))]
    if differ:
        was = " ".join(f"{g}={tags[f'choice.{g}']}" for g in groups if f"choice.{g}" in tags)
        now = ", ".join(f"{g}={choices.get(g)} (was {tags[f'choice.{g}']})" for g in differ)
        raise ValueError(f"ckpt_path={ckpt_path} belongs to MLflow run {run_id}, started with {was}; this command "
                         f"has {now}. Resume with the run's overrides: fibo-run {was} <its other overrides> "
                         f"ckpt_path={ckpt_path}")


def _result_name(cfg: DictConfig) -> str:
    """The run's headline metric: ``result_metric.test`` after testing, else ``result_metric.fit``
    (``test/acc1`` / ``val/acc1`` unless a task config says otherwise, e.g. ``rollout/success_rate``)."""
    names = cfg.get("result_metric") or {}
    return names.get("test", "test/acc1") if cfg.test else names.get("fit", "val/acc1")


def _report(cfg: DictConfig, logger, choices: dict, metrics: dict, result) -> None:
    name = _result_name(cfg)
    density = metrics.get("attention/density")
    lines = [
        "",
        f"fibo: {name} = {float(result):.4f}" if result is not None else f"fibo: no {name} was computed",
        f"  task={choices.get('task')} data={choices.get('data')} model={choices.get('model')} "
        f"attention={choices.get('attention')} seed={cfg.seed}"
        + (f" (attention density {100 * density:.2f}% incl. CLS)" if density is not None else ""),
        f"  MLflow run {logger.run_id} ({cfg.run_name}) in experiment '{cfg.experiment_name}'",
        f"  tracking URI: {logger._tracking_uri}",
        f"  browse: mlflow ui --backend-store-uri {logger._tracking_uri}",
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
