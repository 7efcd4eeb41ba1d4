"""Every config group composes and instantiates; unknown choices fail with Hydra's list of options."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from fibo.cli import CONF_DIR

GROUPS = ["task", "data", "model", "attention", "trainer", "logger", "callbacks", "paths", "hydra", "debug"]


VIDEO_DATA = {
    "moving_digits": [],
    "videofolder": ["data.root=/videos", "data.num_classes=101"],
    "videolist": ["data.train_list=train.txt", "data.val_list=val.txt", "data.num_classes=60"],
}

ROBOT_DATA = {"lift": [], "metaworld": [], "robomimic_hdf5": ["data.path=/demos/image.hdf5"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose_cfg(tmp_path, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_group_exists_and_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "imagefolder":
        overrides.append(f"data.root={tmp_path}")
    video = option.startswith("timesformer") or option in VIDEO_DATA
    if video:
        overrides = ["task=video", *overrides, *VIDEO_DATA.get(option, [])]
    robot = option.startswith("policy_") or option in ROBOT_DATA
    if robot:
        overrides = ["task=robot", *overrides, *ROBOT_DATA.get(option, [])]
    cfg = compose_cfg(tmp_path, overrides)
    assert cfg.hydra.runtime.choices[group] == option
    if robot:  # robot data and policies: tests/test_robot*.py check them further
        built = instantiate(cfg.data if group == "data" else cfg.model)
        assert built.action_dim == cfg.data.action_dim
    elif group == "data":
        dm = instantiate(cfg.data)
        assert dm.img_size == cfg.data.img_size and dm.num_classes == cfg.data.num_classes
    if group in ("model", "attention") and not robot:
        with open_dict(cfg):
            cfg.model.depth = 2  # keep vit_base cheap
        model = instantiate(cfg.model)
        assert model.attention_spec.name == cfg.attention.name
    if group == "trainer" and not (cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()):  # gpu, ddp, fsdp
        assert instantiate(cfg.trainer, logger=False, enable_checkpointing=False).max_epochs == cfg.trainer.max_epochs
    if group == "callbacks":
        assert all(instantiate(c) is not None for c in cfg.callbacks.values())
    if group == "logger":
        logger = instantiate(cfg.logger)
        assert logger._tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_default_composition(tmp_path):
    cfg = compose_cfg(tmp_path)
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.data, choices.model, choices.attention) == ("image", "digits", "vit_nano", "fibottention")
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model)
    assert task.hparams.num_classes == 10
    assert model.num_patch_tokens == 64  # >= 49 patch tokens on the default data


def test_video_task_picks_video_data_and_model(tmp_path):
    cfg = compose_cfg(tmp_path, ["task=video"])
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.model, choices.attention) == ("moving_digits", "timesformer_fibo", "fibottention")
    dense = compose_cfg(tmp_path, ["task=video", "model=timesformer"])
    assert dense.hydra.runtime.choices.attention == "dense"
    # the command line still wins over a model's attention default
    mixed = compose_cfg(tmp_path, ["task=video", "model=timesformer", "attention=fibottention", "attention.temporal=fibottention"])
    model = instantiate(mixed.model)
    assert model.attention_spec.name == "fibottention" and model.temporal_spec.name == "fibottention"


def test_tracking_uri_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    cfg = compose_cfg(tmp_path)
    assert instantiate(cfg.logger)._tracking_uri == f"sqlite:///{tmp_path / 'elsewhere.db'}"


def test_unknown_choice_lists_available_options(tmp_path, run_fibo):
    result = run_fibo("attention=fibo", root=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Could not find 'attention/fibo'" in result.stderr
    block = result.stderr.split("Available options in 'attention':\n")[1].split("Config search path")[0]
    listed = [line.strip() for line in block.splitlines() if line.startswith("\t")]
    assert listed == options("attention") and "fibottention" in listed


def test_bad_value_is_reported_before_training(tmp_path, run_fibo):
    result = run_fibo("data.img_size=17", "debug=fast_dev_run", root=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "image size 17 is not divisible by patch size 2" in result.stderr
