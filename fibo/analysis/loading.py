"""From a checkpoint written by ``fibo-run`` back to its run: config, MLflow run id, data, model.

A run folder (``fibo-run``'s Hydra output directory) holds ``.hydra/config.yaml`` (the composed,
unresolved config) and ``checkpoints/*.ckpt``; the checkpoint holds the MLflow run id
(``fibo.tracking.RUN_ID_KEY``, read with :func:`fibo.tracking.load_checkpoint`). The config is resolved as the run resolved it:
``paths.output_dir`` is the run folder and ``paths.root_dir`` (when it was the default) the
directory the run was started from (``.hydra/hydra.yaml``), unless ``$FIBO_ROOT`` is set now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = {"ImageClassifier": "image", "VideoClassifier": "video"}


@dataclass
class RunCheckpoint:
    """A checkpoint and what belongs to it: ``cfg`` (resolved run config), ``run_dir``, ``run_id``
    (MLflow), ``kind`` (``image`` or ``video``) and the Lightning ``state_dict``."""

    path: Path
    run_dir: Path
    cfg: Any
    run_id: str
    kind: str
    state_dict: dict


def run_config(run_dir: Path, ckpt_path: Path):
    """The run's config from ``run_dir/.hydra/config.yaml``, resolved (module docstring).

    Raises:
        ValueError: the file is missing (not a fibo-run folder).
    """
    from omegaconf import OmegaConf

    import fibo.cli  # noqa: F401 - registers fibo's resolvers (fibo.cwd)

    file = run_dir / ".hydra" / "config.yaml"
    if not file.is_file():
        raise ValueError(f"ckpt_path={ckpt_path} is not in a fibo-run folder: {file} is missing "
                         f"(fibo-analyze reads the run's config next to its checkpoints/ directory)")
    cfg = OmegaConf.load(file)
    paths = cfg.get("paths")
    if paths is not None:
        paths.output_dir = str(run_dir)
        if OmegaConf.is_interpolation(paths, "root_dir"):
            hydra_file = run_dir / ".hydra" / "hydra.yaml"
            cwd = OmegaConf.load(hydra_file).hydra.runtime.cwd if hydra_file.is_file() else str(run_dir)
            paths.root_dir = os.environ.get("FIBO_ROOT") or cwd
    OmegaConf.resolve(cfg)
    return cfg


def load_checkpoint(ckpt_path: str | None) -> RunCheckpoint:
    """Check ``ckpt_path`` and gather its run.

    Raises:
        ValueError: no ``ckpt_path``; not a readable Lightning checkpoint; no MLflow run id in it
            (not written by fibo-run); no run config beside it; a task other than image/video.
        FileNotFoundError: ``ckpt_path`` is not a file (both from :func:`fibo.tracking.load_checkpoint`).
    """
    from fibo.tracking import RUN_ID_KEY, load_checkpoint as load_ckpt

    if not ckpt_path:
        raise ValueError("ckpt_path is missing: fibo-analyze ckpt_path=<run dir>/checkpoints/last.ckpt "
                         "(a checkpoint written by fibo-run for an image or video task)")
    path = Path(str(ckpt_path)).expanduser()
    ckpt = load_ckpt(str(path))  # FileNotFoundError / ValueError naming ckpt_path
    run_id = ckpt.get(RUN_ID_KEY)
    if not run_id or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} is not a fibo checkpoint (no MLflow run id in it): "
                         f"pass a .ckpt written by fibo-run")
    run_dir = path.resolve().parent.parent
    cfg = run_config(run_dir, path)
    target = str(cfg.get("task", {}).get("_target_", ""))
    kind = TASKS.get(target.rsplit(".", 1)[-1])
    if kind is None:
        raise ValueError(f"ckpt_path={ckpt_path} is a checkpoint of task {target or '?'}; fibo-analyze supports "
                         f"image and video runs (task=image, task=video)")
    return RunCheckpoint(path, run_dir, cfg, run_id, kind, ckpt["state_dict"])


def build_task(run: RunCheckpoint):
    """``(datamodule, task)`` instantiated from the run's config by :func:`fibo.cli.build_modules`
    (without trainer, logger or callbacks), with the checkpoint's weights loaded (strict), in eval mode.

    Raises:
        ValueError: the run config no longer builds (e.g. an option this fibo has dropped), or the
            weights do not fit the model it builds.
    """
    from hydra.errors import InstantiationException

    from fibo.cli import build_modules

    try:
        datamodule, _, task = build_modules(run.cfg)
    except InstantiationException as err:
        cause = err.__cause__ or err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"ckpt_path={run.path}: its run config ({run.run_dir / '.hydra' / 'config.yaml'}) does not "
                         f"build with this fibo: {first}") from None
    try:
        task.load_state_dict(run.state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"ckpt_path={run.path}: its weights do not fit the model of its run config ({first})") from None
    return datamodule, task.eval()
