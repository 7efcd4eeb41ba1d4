"""Every config group composes and instantiates; unknown choices fail with Hydra's list of options;
each group writes only its own keys, and the user-facing presets compose as before."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

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
    if robot:  # the oracle's object state is a data key: its overlay adds it
        overrides = ["task=robot", *overrides, *ROBOT_DATA.get(option, [])]
        overrides += ["experiment=robot_oracle"] if option == "policy_oracle" else []
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
    mixed = compose_cfg(tmp_path, ["task=video", "model=timesformer", "attention=fibottention", "model.temporal_attention=same"])
    model = instantiate(mixed.model)
    assert model.attention_spec.name == "fibottention" and model.temporal_spec.name == "fibottention"
    assert instantiate(dense.model).temporal_spec.name == "dense"  # the default: dense temporal attention


def instantiate_error(node) -> str:
    """The message of the error that instantiating ``node`` raises (Hydra wraps it: its cause)."""
    with pytest.raises(Exception) as info:
        instantiate(node)
    return str(info.value.__cause__ or info.value)


def test_temporal_attention_is_a_key_of_the_video_model(tmp_path):
    old = compose_cfg(tmp_path, ["task=video", "+attention.temporal=fibottention"])  # the old key, appended
    assert instantiate_error(old.model) == ("attention.temporal='fibottention' is no longer an attention option: the "
                                            "temporal pattern of a video model is model.temporal_attention=dense|same "
                                            "(TimeSformer only)")
    image = compose_cfg(tmp_path, ["+attention.temporal=dense"])  # image models no longer drop it silently
    assert instantiate_error(image.model).startswith("attention.temporal='dense' is no longer an attention option")
    bad = compose_cfg(tmp_path, ["task=video", "model.temporal_attention=fibottention"])
    assert instantiate_error(bad.model) == ("model.temporal_attention='fibottention': choose 'dense' or 'same' (the "
                                            "spatial pattern, here 'fibottention', over the frames)")


# ---- configs own their keys ------------------------------------------------------------------------

GOLDEN = json.loads((Path(__file__).parent / "golden" / "config_presets.json").read_text())
GOLDEN.pop("_about")


BC_HEAD_AS_BEFORE = {"name": "bc", "n_obs_steps": 1, "horizon": 1, "n_action_steps": 1, "ema": None}


def _as_before(model: dict, attention: dict) -> tuple[dict, dict]:
    """Today's composed ``model`` / ``attention`` in the layout of the golden file: the temporal pattern
    back under ``attention.temporal`` (it is ``model.temporal_attention``: ``same`` meant the spatial
    pattern's name), ``model.object_state``, ``attention.shared_offsets: false`` and
    ``attention.shared_set: first`` (new, off = the old pattern) and ``model.head`` when it is the BC
    head of before (``model/head=bc``: one observation, one action, executed at once, no EMA) left out."""
    model, attention = dict(model), dict(attention)
    if model.get("head") == BC_HEAD_AS_BEFORE:
        del model["head"]
    if attention.get("shared_offsets") is False:
        del attention["shared_offsets"]
    if attention.get("shared_set") == "first":
        del attention["shared_set"]
    temporal = model.pop("temporal_attention", "dense")
    temporal = attention["name"] if temporal == "same" else temporal
    model.pop("object_state", None)
    attention["temporal"] = temporal
    if isinstance(model.get("attention"), dict):
        new = (("shared_offsets", False), ("shared_set", "first"))
        model["attention"] = {**{k: v for k, v in model["attention"].items() if (k, v) not in new},
                              "temporal": temporal}
    return model, attention


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_presets_compose_to_the_same_model_and_attention_as_before(case):
    """model=timesformer_fibo / timesformer / policy_* / vit_*, every data preset's patch size and the
    paper overlays: the same model and attention configs as before the configs owned their keys."""
    golden = GOLDEN[case]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=golden["overrides"])
    model, attention = (OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "attention"))
    assert _as_before(model, attention) == (golden["model"], golden["attention"])


def _groups(cfg) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}


def _model_options() -> list[str]:
    return sorted(str(p.relative_to(Path(CONF_DIR) / "model").with_suffix("")) for p in (Path(CONF_DIR) / "model").rglob("*.yaml")
                  if p.parent.name != "patch_size")


@pytest.mark.parametrize("option", _model_options())
def test_model_files_write_only_model_keys(tmp_path, option):
    """Every model file (presets and bases) changes nothing but ``model`` (a preset may choose the
    ``attention`` option, never write its keys): the rest of the config is the task's default."""
    task = "video" if "timesformer" in option else "robot" if "policy" in option else "image"
    default = _groups(compose_cfg(tmp_path, [f"task={task}"]))
    cfg = compose_cfg(tmp_path, [f"task={task}", f"model={option}"])
    chosen = _groups(cfg)
    assert {k: v for k, v in chosen.items() if k not in ("model", "attention")} == \
        {k: v for k, v in default.items() if k not in ("model", "attention")}
    if chosen["attention"] != default["attention"]:  # chosen whole, as attention=<its option> gives it
        option_only = _groups(compose_cfg(tmp_path, [f"task={task}", f"attention={cfg.hydra.runtime.choices.attention}"]))
        assert chosen["attention"] == option_only["attention"]


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONF_DIR) / "attention").glob("*.yaml")))
def test_attention_files_write_only_attention_keys(tmp_path, option):
    default = _groups(compose_cfg(tmp_path, ["attention=dense"]))
    chosen = _groups(compose_cfg(tmp_path, [f"attention={option}"]))
    assert {k: v for k, v in chosen.items() if k != "attention"} == {k: v for k, v in default.items() if k != "attention"}
    assert set(chosen["attention"]) >= {"name", "mask_semantics", "backend"} and "temporal" not in chosen["attention"]
    own = yaml.safe_load((Path(CONF_DIR) / "attention" / f"{option}.yaml").read_text())
    assert own["defaults"] == ["base/common", "_self_"]  # the shared keys live in one file
    assert not {"mask_semantics", "backend"} & set(own), f"{option}.yaml repeats a key of base/common.yaml"


def test_patch_size_table_writes_only_model_patch_size():
    for path in sorted((Path(CONF_DIR) / "model" / "patch_size").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# @package model\n") and set(yaml.safe_load(text)) == {"patch_size"}, path.name
        assert (Path(CONF_DIR) / "data" / path.name).is_file(), f"{path.name} names no data option"
    for path in sorted((Path(CONF_DIR) / "data").glob("*.yaml")):
        assert "patch_size" not in yaml.safe_load(path.read_text()), f"data/{path.name} sets the model's patch size"


def test_base_models_take_the_attention_from_the_attention_group(tmp_path):
    """Fibottention or dense is chosen by attention= alone; the presets are the base files plus it."""
    for base, preset, dense_preset, task in (("base/timesformer", "timesformer_fibo", "timesformer", "video"),
                                              ("base/policy", "policy_fibo", "policy_dense", "robot")):
        for attention, same_as in (("fibottention", preset), ("dense", dense_preset)):
            cfg = compose_cfg(tmp_path, [f"task={task}", f"model={base}", f"attention={attention}"])
            assert OmegaConf.to_container(cfg.model, resolve=True) == \
                OmegaConf.to_container(compose_cfg(tmp_path, [f"task={task}", f"model={same_as}"]).model, resolve=True)
    vit = compose_cfg(tmp_path, ["model=base/vit", "model.name=vit_small", "attention=dense"])
    assert OmegaConf.to_container(vit.model, resolve=True) == \
        OmegaConf.to_container(compose_cfg(tmp_path, ["model=vit_small", "attention=dense"]).model, resolve=True)


@pytest.mark.parametrize("overrides,tokens", [
    ([], 64), (["data=cifar10"], 64), (["data=imagefolder", "data.root=/x"], 64),  # 16/2, 32/4, 64/8
    (["task=video"], 64), (["task=video", "data=videofolder", "data.root=/v", "data.num_classes=3"], 196),
    (["data=cifar10", "model.patch_size=8"], 16),  # the model's key wins over the per-data default
    (["data=digits", "data.img_size=32"], 256),  # the data's size, the model's patch (2)
])
def test_patch_size_is_the_models(tmp_path, overrides, tokens):
    cfg = compose_cfg(tmp_path, overrides)
    with open_dict(cfg):
        cfg.model.depth = 1
    assert instantiate(cfg.model).num_patch_tokens == tokens


def test_zero_patch_size_names_the_key(tmp_path):
    message = ("model.patch_size=0 must be a positive integer: the patch side in pixels, dividing the image size "
               "(e.g. 2 for 16 px images, 16 for 224 px)")
    assert instantiate_error(compose_cfg(tmp_path, ["model.patch_size=0"]).model) == message  # was a ZeroDivisionError
    assert instantiate_error(compose_cfg(tmp_path, ["task=video", "model.patch_size=0"]).model) == message
    assert instantiate_error(compose_cfg(tmp_path, ["model.patch_size=3"]).model) == (
        "image size 16 is not divisible by patch size 3: choose an image size that is a multiple of 3 (e.g. 15) "
        "or a patch size that divides 16")


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
    # one line naming it, no traceback (Hydra's instantiate error unwrapped by fibo.cli.input_error)
    assert "Traceback" not in result.stderr and "Error in call to target" not in result.stderr
    assert any(line.startswith("fibo-run: error: image size 17 is not divisible by patch size 2: choose an image "
                               "size that is a multiple of 2") for line in result.stderr.splitlines()), result.stderr
