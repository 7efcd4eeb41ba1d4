"""Checks of a composed config's values that ``fibo-run`` makes before the MLflow run is created, so
that a bad value (``data.batch_size=0``, ``task.lr=-1``, ``data.img_size=-4``, ``model.patch_size=0``,
``attention.backend=flex`` when training on the CPU, ...) stops with one line and leaves no FAILED run
in the store. Each check calls the validator that the component itself runs when it is built
(:func:`fibo.tasks.base.check_recipe`, :func:`fibo.data.transforms.check_img_size`,
:func:`fibo.models.vit.check_patch_grid`, :func:`fibo.models.policy.check_action_steps`, the
backend's ``supports``; a task and data, or task and model, of different modalities are named as such
first), so the message is the same
either way; what needs the data or the built model (``data.train_samples`` against the dataset's
size, a checkpoint's shapes) is checked where those exist. :func:`fibo.launch.prepare_job` calls
:func:`check_config`."""

from __future__ import annotations

from numbers import Real
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MISSING = object()


def _get(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at ``key`` (resolved, containers as plain Python), or ``_MISSING`` when the key
    is absent, ``???`` or does not resolve (that error is left to the code that uses it)."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - omegaconf's resolution errors: not this module's to report
        return _MISSING
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _number(key: str, value: Any) -> Real:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{key}={value!r} is not a number: e.g. {key}=1e-3")
    return value


def _integer(key: str, value: Any, least: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key}={value!r} must be an integer >= {least} ({example})")


def _modality(target: Any) -> str | None:
    """The ``modality`` class attribute (image / video / robot) of the class at ``target``, None when
    there is none or the class cannot be imported (that error is left to instantiate)."""
    from hydra.utils import get_class

    try:
        return getattr(get_class(str(target)), "modality", None)
    except Exception:  # noqa: BLE001 - import errors: instantiate reports them with the target
        return None


def data_options(modality: str, conf_dir: str) -> list[str]:
    """The ``<conf_dir>/data/`` options whose data module serves ``modality``."""
    from pathlib import Path

    root = Path(conf_dir) / "data"
    options = []
    for path in sorted(root.glob("*.yaml")):
        target, _ = _preset_target(root, path.stem)
        if target is not None and _modality(target) == modality:
            options.append(path.stem)
    return options


def model_modality(target: Any, name: Any = None) -> str | None:
    """The modality of the model a ``model`` config builds: the ``modality`` attribute of the class at
    ``target``, or of the class a factory there is annotated to return; for
    :func:`fibo.models.create_model`, of the class registered as ``name``. None when unknown (errors
    are left to instantiate)."""
    from typing import get_type_hints

    from hydra.utils import get_object

    try:
        built = get_object(str(target))
    except Exception:  # noqa: BLE001 - import errors: instantiate reports them with the target
        return None
    from fibo.models import ARCHITECTURES, create_model

    if built is create_model:
        built = ARCHITECTURES.get(str(name), (None,))[0]
    elif callable(built) and not isinstance(built, type):
        try:
            built = get_type_hints(built).get("return")
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: unknown
            return None
    return getattr(built, "modality", None)


def _preset_target(root: Any, stem: str, depth: int = 0) -> tuple[Any, Any]:
    """(``_target_``, ``name``) of the config group option ``<root>/<stem>.yaml``, following its
    defaults list (``base/vit``, another preset of the group) for what the file itself does not set."""
    node = OmegaConf.load(root / f"{stem}.yaml")
    target, name = node.get("_target_"), node.get("name")
    for entry in node.get("defaults", []) or []:
        if depth < 4 and isinstance(entry, str) and (root / f"{entry}.yaml").exists():
            base_target, base_name = _preset_target(root, entry, depth + 1)
            target, name = target or base_target, name or base_name
    return target, name


def model_options(modality: str, conf_dir: str) -> list[str]:
    """The ``<conf_dir>/model/`` options whose model serves ``modality``."""
    from pathlib import Path

    root = Path(conf_dir) / "model"
    options = []
    for path in sorted(root.glob("*.yaml")):
        target, name = _preset_target(root, path.stem)
        if target is not None and model_modality(target, name) == modality:
            options.append(path.stem)
    return options


def check_task_model(cfg: DictConfig, choices: dict | None = None, conf_dir: str | None = None) -> None:
    """The model serves the task's modality (``task=image model=timesformer`` would otherwise fail on an
    interpolation the image data lacks); ``conf_dir``: the message lists the model options that fit."""
    task_modality = _modality(_get(cfg, "task._target_"))
    target = OmegaConf.select(cfg, "model._target_", default=None)
    name = OmegaConf.select(cfg, "model.name", default=None, throw_on_resolution_failure=False)
    model_mod = model_modality(target, name) if target is not None else None
    if task_modality is None or model_mod is None or task_modality == model_mod:
        return
    choices = choices or {}
    model, task = choices.get("model", name or target), choices.get("task", task_modality)
    fits = "|".join(model_options(task_modality, conf_dir)) if conf_dir else f"a {task_modality} model config"
    article = "an" if model_mod[0] in "aeiou" else "a"
    raise ValueError(f"model={model} is {article} {model_mod} model, but task={task} trains on {task_modality} data: "
                     f"pass model=<{fits}> for task={task}, or task={model_mod} for model={model}")


def check_task_data(cfg: DictConfig, choices: dict | None = None, conf_dir: str | None = None) -> None:
    """The data module serves the task's modality (``modality``: image, video or robot, a class
    attribute of both): ``task=image data=lift`` would otherwise fail later on an unrelated value.
    ``conf_dir`` (the config root): the message lists the data options that fit the task."""
    task_modality = _modality(_get(cfg, "task._target_"))
    data_modality = _modality(_get(cfg, "data._target_"))
    if task_modality is None or data_modality is None or task_modality == data_modality:
        return
    choices = choices or {}
    data, task = choices.get("data", _get(cfg, "data._target_")), choices.get("task", task_modality)
    fits = "|".join(data_options(task_modality, conf_dir)) if conf_dir else f"a {task_modality} data config"
    raise ValueError(f"data={data} holds {data_modality} data, but task={task} trains on {task_modality} data: "
                     f"pass task={data_modality} for data={data}, or data=<{fits}> for task={task}")


def check_task(cfg: DictConfig) -> None:
    """``task.lr`` > 0, ``task.weight_decay``/``warmup_epochs``/``min_lr`` >= 0, ``data.batch_size`` and
    ``task.lr_base_batch`` >= 1 (:func:`fibo.tasks.base.check_recipe`), for the keys the task has;
    a value that is not a number is named as such."""
    from fibo.tasks.base import check_recipe

    if "task" not in cfg or _get(cfg, "task.lr") is _MISSING:
        return
    benign = {"lr": 1.0, "weight_decay": 0.0, "warmup_epochs": 0.0, "min_lr": 0.0}
    values = {}
    for name, default in benign.items():
        value = _get(cfg, f"task.{name}")
        values[name] = default if value is _MISSING else _number(f"task.{name}", value)
    for name in ("batch_size", "lr_base_batch"):
        value = _get(cfg, f"task.{name}")
        values[name] = None if value is _MISSING or value is None else value
    check_recipe(**values)


def check_data(cfg: DictConfig) -> None:
    """``data.batch_size`` an integer >= 1, ``data.num_workers`` >= 0 and ``data.img_size`` a positive
    side or ``[height, width]`` (:func:`fibo.data.transforms.check_img_size`; a data module that
    takes square frames only says so when it is built)."""
    from fibo.data.transforms import check_img_size
    from fibo.tasks.base import check_recipe

    batch = _get(cfg, "data.batch_size")
    if batch is not _MISSING:
        if isinstance(batch, bool) or not isinstance(batch, int):
            raise ValueError(f"data.batch_size={batch!r} is not an integer: samples per batch and process, "
                             f"e.g. data.batch_size=32")
        check_recipe(lr=1.0, weight_decay=0.0, warmup_epochs=0.0, min_lr=0.0, batch_size=batch, lr_base_batch=None)
    workers = _get(cfg, "data.num_workers")
    if workers is not _MISSING and workers is not None:
        _integer("data.num_workers", workers, 0, "DataLoader worker processes; 0 loads in the main process")
    img_size = _get(cfg, "data.img_size")
    if img_size is not _MISSING and img_size is not None:
        check_img_size(img_size)


def check_model(cfg: DictConfig) -> None:
    """A ViT / TimeSformer's ``model.patch_size`` divides ``model.img_size`` (= ``data.img_size``):
    :func:`fibo.models.vit.check_patch_grid`."""
    from fibo.models.vit import check_patch_grid

    img_size, patch_size = _get(cfg, "model.img_size"), _get(cfg, "model.patch_size")
    if img_size is not _MISSING and patch_size is not _MISSING and img_size is not None:
        check_patch_grid(tuple(img_size) if isinstance(img_size, list) else img_size, patch_size)


def check_robot_head(cfg: DictConfig) -> None:
    """A policy head's windows (``model.head``): ``n_obs_steps`` and ``horizon`` integers >= 1,
    ``n_action_steps`` between 1 and the horizon (:func:`fibo.models.policy.check_action_steps`), a
    diffusion head's horizon a multiple of its U-Net's halvings (:func:`fibo.models.diffusion.check_horizon`)."""
    if _get(cfg, "model.head") is _MISSING:
        return
    for name, what in (("n_obs_steps", "observations per prediction"), ("horizon", "actions per prediction")):
        value = _get(cfg, f"model.head.{name}")
        if value is not _MISSING:
            _integer(f"model.head.{name}", value, 1, f"{what}, e.g. model.head.{name}=2")
    steps, horizon = _get(cfg, "model.head.n_action_steps"), _get(cfg, "data.seq_length")
    if steps is not _MISSING and isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1:
        from fibo.models.policy import check_action_steps

        check_action_steps(steps, horizon)
    down_dims = _get(cfg, "model.head.down_dims")
    if (_get(cfg, "model.head.name") == "diffusion" and isinstance(down_dims, list) and down_dims
            and isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1):
        from fibo.models.diffusion import check_horizon

        check_horizon(horizon, down_dims)


def training_device(cfg: DictConfig) -> str | None:
    """``cpu`` or ``cuda``: where ``cfg.trainer`` trains (``accelerator`` ``cpu``; ``auto`` without
    CUDA), None when it cannot be told from the config (another accelerator)."""
    accelerator = str(_get(cfg, "trainer.accelerator")).lower()
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("auto", "gpu", "cuda"):
        import torch

        return "cuda" if torch.cuda.is_available() else ("cpu" if accelerator == "auto" else None)
    return None


def check_attention_backend(cfg: DictConfig) -> None:
    """``attention.backend=flex`` where training runs on the CPU: FlexAttention has no CPU backward, so
    the run would fail at its first training step (the Flex backend's own reason, with the fix)."""
    from fibo.attention.backends import BACKENDS, AttentionCall

    if (_get(cfg, "attention.backend") != "flex" or _get(cfg, "attention.name") == "dense"  # dense: always sdpa
            or training_device(cfg) != "cpu"):
        return
    import torch

    call = AttentionCall(device=torch.device("cpu"), dtype=torch.float32, num_tokens=1, requires_grad=True)
    reason = BACKENDS["flex"].supports(call)
    if reason:
        accelerator = _get(cfg, "trainer.accelerator")
        where = f"trainer.accelerator={accelerator}" + ("" if str(accelerator).lower() == "cpu" else ", no GPU here")
        raise ValueError(f"attention.backend=flex cannot train on the CPU ({where}): {reason}")


def check_trainer(cfg: DictConfig) -> None:
    """``trainer.max_epochs`` an integer >= 1, -1 (no limit) or null, as Lightning takes it; 0 (which
    Lightning accepts and then trains nothing, ending FINISHED) is refused with the fix."""
    epochs = _get(cfg, "trainer.max_epochs")
    if epochs is not _MISSING and epochs is not None:
        _integer("trainer.max_epochs", epochs, -1, "epochs to train; -1 = no limit, e.g. trainer.max_epochs=40")
        if epochs == 0:
            raise ValueError("trainer.max_epochs=0 trains nothing: pass trainer.max_epochs>=1 (-1 = no limit), or "
                             "evaluate a checkpoint with fibo-eval ckpt_path=<file.ckpt>")


def check_config(cfg: DictConfig, training: bool = True, choices: dict | None = None,
                 conf_dir: str | None = None) -> None:
    """All the checks above, in the order task/data and task/model pairing, data, model, robot head, task, attention,
    trainer; ``training=False`` (a job that only evaluates, ``fibo-eval``) skips the attention
    backend's and the trainer's checks. ``choices``: Hydra's group choices, to name them in messages;
    ``conf_dir``: the config root, to list the options that fit.

    Raises:
        ValueError: the first bad value, in one line naming its key and the fix.
    """
    check_task_data(cfg, choices, conf_dir)
    check_task_model(cfg, choices, conf_dir)
    checks = (check_data, check_model, check_robot_head, check_task,
              *([check_attention_backend, check_trainer] if training else []))
    for check in checks:
        check(cfg)
