"""What ``fibo-run`` does with the command line before a run starts: checks of the overrides and run
options (one line each), command-line paths made absolute against the launch directory, the default
run name, the ``${fibo.cwd:}`` / ``${fibo.run_suffix:}`` resolvers, and the argv that DDP children of a
multirun job see. :func:`prepare_job` runs them in order; :mod:`fibo.cli` calls it first."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class UsageError(ValueError):
    """A bad command line, found before any run starts: ``fibo-run`` prints its one-line message
    (``fibo-run: error: ...``, exit status 1) without a traceback."""

#: Errors that name a bad input and its fix in their message (fibo raises them with one line): the
#: command line, a config value, a checkpoint, a dataset, the MLflow store, a diverged loss.
INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FloatingPointError)

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
        UsageError: one line naming the option and what it takes.
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise UsageError(f"seed={cfg.seed!r} is not an integer: pass seed=<int>, e.g. seed=0")
    if not str(cfg.experiment_name or "").strip():
        raise UsageError(f"experiment_name={cfg.experiment_name!r} is empty: pass an MLflow experiment name, "
                         f"e.g. experiment_name=fibo")


def check_overrides(overrides: list[str], conf_dir: str = CONF_DIR) -> None:
    """Refuse a dot-override that sets a config group's name to a string (``model.attention=dense``):
    Hydra accepts it and the run fails later with an unrelated error; the group is chosen without the
    dot. Generic: any ``a.b.<group>=<string>`` where ``conf/<group>/`` is a config group.

    Raises:
        UsageError: naming the override and the group choice to write instead.
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
            raise UsageError(f"{override.input_line} sets {key} to the string {value!r}, but {group} is a config "
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


def default_run_name(cfg: DictConfig, choices: dict, swept: list[str] = ()) -> str:
    """``<model>[-<head>]-<attention>-<data>-s<seed>`` (``<head>``: the ``model/head`` choice of a robot
    policy, bc or diffusion), then this job's values of what else a sweep varies."""
    model = "-".join(str(c) for c in (choices.get("model"), choices.get("model/head")) if c)
    base = f"{model}-{choices.get('attention')}-{choices.get('data')}-s{cfg.seed}"
    return "-".join([base, *swept])


def swept_overrides(job_overrides: list[str], argv: list[str], searched: tuple[str, ...] = ()) -> list[str]:
    """This job's values (``task.lr=0.01``) of the overrides that the command line ``argv`` sweeps
    (``task.lr=0.01,0.1``) or that a search sweeper draws (``searched``: the keys of Optuna's
    ``hydra.sweeper.params``), other than model, attention, data and seed (the default name has them).
    Empty when nothing is swept or ``argv`` cannot be parsed (a job launched by a remote launcher)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        swept = {o.key_or_group for o in parser.parse_overrides([a for a in argv if not a.startswith("-")])
                 if o.is_sweep_override()} | set(searched)
        jobs = parser.parse_overrides(job_overrides)
    except Exception:  # noqa: BLE001 - Hydra's parser raises its own types
        return []
    return [o.input_line for o in jobs if o.key_or_group in swept and o.key_or_group not in NAMED_GROUPS]


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


def prepare_job(cfg: DictConfig, hydra_cfg, training: bool = True) -> dict:
    """Check the job's overrides, run options and config values (:func:`fibo.config_check.check_config`:
    before the MLflow run is created, so a bad value leaves no FAILED run; ``training=False``: the job
    only evaluates, as ``fibo-eval``), make its command-line paths absolute (against
    Hydra's ``runtime.cwd``) and give it the default run name when ``run_name`` is null. Returns the
    Hydra choices (group -> option).

    Raises:
        UsageError: a dot-override of a config group, a bad seed or experiment name, a config value
            out of range (one line each).
    """
    from hydra.types import RunMode

    from fibo.config_check import check_config

    overrides = list(hydra_cfg.overrides.task)
    check_overrides(overrides)
    check_run_options(cfg)
    try:
        check_config(cfg, training=training, choices=dict(hydra_cfg.runtime.choices), conf_dir=CONF_DIR)
    except ValueError as err:  # before the MLflow run exists: a bad value leaves no FAILED run
        raise UsageError(str(err)) from None
    absolute_cli_paths(cfg, overrides, hydra_cfg.runtime.cwd)
    choices = dict(hydra_cfg.runtime.choices)
    if cfg.run_name is None:
        searched = tuple(OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or ())
        swept = swept_overrides(overrides, sys.argv[1:], searched) if hydra_cfg.mode == RunMode.MULTIRUN else []
        cfg.run_name = default_run_name(cfg, choices, swept)
    return choices
