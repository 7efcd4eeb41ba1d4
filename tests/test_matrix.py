"""Every task x every debug overlay x {dense, fibottention}: compose with Hydra's API, build with
``fibo.cli.build`` and run one ``fast_dev_run`` step in-process (tiny data the tests write)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import open_dict

from fibo.cli import build

TASKS = ["image", "video", "robot"]
DEBUG = ["fast_dev_run", "short", "overfit"]
ATTENTION = ["dense", "fibottention"]
LOW_DIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}


def write_lift_like(path: Path, lengths=(4, 5, 4), size=84) -> Path:
    """A robomimic-layout file with data=lift's keys (84x84 agentview images), 3 short demos."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("obs/agentview_image", data=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8))
            for key, dim in LOW_DIM.items():
                g.create_dataset(f"obs/{key}", data=rng.normal(size=(n, dim)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)).astype(np.float32))
            g.attrs["num_samples"] = n
        data.attrs["total"] = int(sum(lengths))
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}})
        f.create_dataset("mask/train", data=np.array(["demo_0", "demo_2"], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(["demo_1"], dtype="S"))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fibo.data.moving_digits import MovingDigitsSpec, generate

    root = tmp_path_factory.mktemp("matrix")
    return {"video": generate(root / "moving_digits", MovingDigitsSpec(per_class=(1, 1, 1))),
            "robot": write_lift_like(root / "lift.hdf5")}


def task_overrides(task: str, data: dict) -> list[str]:
    if task == "video":
        return [f"data.root={data['video']}", "data.generate=null", "data.batch_size=2", "data.cache_frames=false",
                "data.test_clips=1"]
    if task == "robot":
        return [f"data.path={data['robot']}", "data.batch_size=2", "callbacks.rollout=null"]
    return ["data.batch_size=8"]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("debug", DEBUG)
@pytest.mark.parametrize("task", TASKS)
def test_one_step_of_every_task_overlay_and_attention(tmp_path, tiny_data, task, debug, attention):
    from test_config import compose_cfg

    cfg = compose_cfg(tmp_path, [f"task={task}", f"debug={debug}", f"attention={attention}",
                                 *task_overrides(task, tiny_data)])
    assert cfg.attention.name == attention
    with open_dict(cfg):  # the overlay as composed, cut down to one step of each stage
        cfg.trainer.fast_dev_run = 1
        cfg.trainer.max_epochs = 1
    built = build(cfg)  # the config's MLflow logger, on the test's own store (fast_dev_run logs nothing)
    built.trainer.fit(built.task, datamodule=built.datamodule)
    assert built.trainer.global_step == 1
    assert np.isfinite(float(built.trainer.callback_metrics["train/loss"]))
    if cfg.test:
        tested = built.trainer.test(built.task, datamodule=built.datamodule)
        assert tested and "test/acc1" in tested[0]
