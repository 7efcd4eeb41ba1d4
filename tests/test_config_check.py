"""Issue #11: a bad config value stops fibo-run with one line BEFORE the MLflow run is created (before:
the run started, building failed inside it, and the store kept a FAILED run for every typo)."""

import sqlite3
from pathlib import Path

import pytest

from conftest import fibo_run, lifecycle_cfg

BAD_VALUES = [
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("data.batch_size=2.5", "data.batch_size=2.5 is not an integer: samples per batch and process, e.g. data.batch_size=32"),
    ("task.lr=-1", "task.lr=-1 must be > 0 (e.g. task.lr=1e-3)"),
    ("task.lr=abc", "task.lr='abc' is not a number: e.g. task.lr=1e-3"),
    ("task.weight_decay=-0.1", "task.weight_decay=-0.1 must be >= 0"),
    ("data.img_size=-4", "data.img_size=-4 is not a positive side in pixels or [height, width] of positive ints: "
                         "e.g. data.img_size=32 or data.img_size=[16,24]"),
    ("model.patch_size=0", "model.patch_size=0 must be a positive integer: the patch side in pixels, dividing the "
                           "image size (e.g. 2 for 16 px images, 16 for 224 px)"),
    ("data.img_size=[16,25]", "image size 25 is not divisible by patch size 2: choose an image size that is a multiple "
                              "of 2 (e.g. 24) or a patch size that divides 25"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0 (DataLoader worker processes; 0 loads in the "
                            "main process)"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing: pass trainer.max_epochs>=1 (-1 = no limit), or "
                             "evaluate a checkpoint with fibo-eval ckpt_path=<file.ckpt>"),  # before: FINISHED, silent
    ("data=lift", "data=lift holds robot data, but task=image trains on image data: pass task=robot for data=lift, "
                  "or data=<cifar10|cifar100|digits|imagefolder> for task=image"),  # before: a patch-size error
    ("task=video data=digits", "data=digits holds image data, but task=video trains on video data: pass task=image "
                               "for data=digits, or data=<moving_digits|videofolder|videolist> for task=video"),
    ("task=robot data=digits", "data=digits holds image data, but task=robot trains on robot data: pass task=image "
                               "for data=digits, or data=<lift|metaworld|robomimic_hdf5> for task=robot"),
    ("model=timesformer", "model=timesformer is a video model, but task=image trains on image data: pass "
                          "model=<vit_base|vit_nano|vit_small|vit_tiny> for task=image, or task=video for "
                          "model=timesformer"),  # before: an OmegaConf interpolation error inside the run
    ("task=robot model=vit_nano", "model=vit_nano is an image model, but task=robot trains on robot data: pass "
                                  "model=<policy_blind|policy_cnn|policy_dense|policy_fibo|policy_oracle> for "
                                  "task=robot, or task=image for model=vit_nano"),
    ("task=robot model.head.horizon=0", "model.head.horizon=0 must be an integer >= 1 (actions per prediction, e.g. "
                                        "model.head.horizon=2)"),  # before: named data.seq_length, inside the run
    ("task=robot model/head=diffusion model.head.n_action_steps=20",
     "model.head.n_action_steps=20 is larger than the horizon, 16 actions per prediction (data.seq_length, by default "
     "model.head.horizon): set model.head.n_action_steps<=16 or model.head.horizon>=20"),
    ("task=robot model/head=diffusion model.head.horizon=10",
     "the diffusion horizon, 10 actions per prediction (data.seq_length, by default model.head.horizon), is not a "
     "multiple of 4 (the U-Net halves it 2 times: model.head.down_dims has 3 levels): set model.head.horizon=8 or 12 "
     "or use fewer model.head.down_dims"),  # before: inside the run, a FAILED run
    ("trainer.max_epochs=-2", "trainer.max_epochs=-2 must be an integer >= -1 (epochs to train; -1 = no limit, e.g. "
                              "trainer.max_epochs=40)"),
    ("attention.backend=flex trainer=cpu", "attention.backend=flex cannot train on the CPU (trainer.accelerator=cpu): "
                                           "FlexAttention has no backward on the CPU (PyTorch raises "
                                           "NotImplementedError); to train on the CPU use attention.backend=sparse or "
                                           "auto (flex runs forward-only there, e.g. under torch.no_grad)"),
]


def _runs_in_store(root: Path) -> list[str]:
    db = root / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT status FROM runs")]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_stops_before_the_mlflow_run_exists(tmp_path, overrides, message):
    from fibo.cli import train
    from fibo.launch import UsageError

    with pytest.raises(UsageError) as err:
        train(lifecycle_cfg(tmp_path, *overrides.split()))
    assert str(err.value) == message
    assert _runs_in_store(tmp_path) == []  # before: one FAILED run
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fibo_run_prints_the_bad_value_in_one_line_and_leaves_no_run(tmp_path):
    result = fibo_run("debug=fast_dev_run", "data.batch_size=0", root=tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "fibo-run: error: data.batch_size=0 must be >= 1"
    assert "Traceback" not in result.stderr
    assert _runs_in_store(tmp_path) == []


@pytest.mark.parametrize("overrides", [
    [],
    ["data.img_size=[16,24]"],
    ["attention=dense", "attention.backend=flex", "trainer=cpu"],  # dense always runs through sdpa
    ["trainer.max_epochs=-1", "data.num_workers=0", "task.lr=1"],
    ["task=video", "model=timesformer", "data=moving_digits"],
    ["task=robot", "model=policy_fibo", "data=lift"],
    ["task=robot", "model=policy_cnn", "data=metaworld"],
])
def test_good_configs_pass_the_check(tmp_path, overrides):
    from fibo.config_check import check_config

    check_config(lifecycle_cfg(tmp_path, *overrides))


def test_flex_is_checked_only_where_training_runs_on_the_cpu(tmp_path, monkeypatch):
    import torch

    from fibo.config_check import check_config, training_device

    cfg = lifecycle_cfg(tmp_path, "attention.backend=flex")  # trainer.accelerator=auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(cfg) == "cuda"
    check_config(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^attention.backend=flex cannot train on the CPU \(trainer.accelerator=auto, "
                                         r"no GPU here\): FlexAttention has no backward on the CPU"):
        check_config(cfg)


def test_an_evaluation_job_may_use_flex_on_the_cpu(tmp_path):
    """fibo-eval runs forward only, where FlexAttention works on the CPU: not refused."""
    from fibo.config_check import check_config

    cfg = lifecycle_cfg(tmp_path, "attention.backend=flex", "trainer=cpu")
    check_config(cfg, training=False)
    with pytest.raises(ValueError, match=r"^attention.backend=flex cannot train on the CPU"):
        check_config(cfg)
