"""Robot data on tiny robomimic HDF5 files written here: episode-edge padding, normalisation, key
validation and the documented fallbacks (no mask/, no env_args)."""

import json
import logging

import h5py
import numpy as np
import pytest
import torch

from fibo.data.robomimic import DatasetError, RobomimicDataModule, SequenceData, compute_stats, inspect_hdf5, split_demos
from fibo.tasks.robot import BehaviorCloning, Normalizer

LOW_DIM = {"robot0_eef_pos": 3, "robot0_gripper_qpos": 2}
ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}}


def write_tiny(path, lengths=(3, 5), image=True, masks=True, env_args=True):
    """Demo i with n steps: eef_pos[t] = (t, i, 0), actions[t] = 10 i + t (all 7 dims), images filled with 10 t;
    mask/valid = the last demo, mask/train = the others."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            t = np.arange(n, dtype=np.float64)
            g.create_dataset("obs/robot0_eef_pos", data=np.stack([t, np.full(n, i), np.zeros(n)], 1))
            g.create_dataset("obs/robot0_gripper_qpos", data=np.stack([0.1 * t, -0.1 * t], 1))
            if image:
                g.create_dataset("obs/agentview_image", data=(10 * t[:, None, None, None] * np.ones((n, 8, 8, 3))).astype(np.uint8))
            g.create_dataset("actions", data=np.repeat((10 * i + t)[:, None], 7, axis=1).astype(np.float32))
            g.attrs["num_samples"] = n
        data.attrs["total"] = int(sum(lengths))
        if masks:
            f.create_dataset("mask/train", data=np.array([f"demo_{i}" for i in range(len(lengths) - 1)], dtype="S"))
            f.create_dataset("mask/valid", data=np.array([f"demo_{len(lengths) - 1}"], dtype="S"))
        if env_args:
            data.attrs["env_args"] = json.dumps(ENV_ARGS)
    return path


def test_padding_at_episode_edges(tmp_path):
    """frame_stack=2, seq_length=3 on episodes of 3 and 5 steps: robomimic repeats edge values; the
    masks say which entries were padding."""
    path = write_tiny(tmp_path / "tiny.hdf5")
    data = SequenceData(path, ["demo_0", "demo_1"], ["agentview_image"], list(LOW_DIM), frame_stack=2, seq_length=3,
                        hdf5_cache_mode="low_dim")
    assert len(data) == 3 + 5
    expected = {  # (demo, t): (observed steps, action steps, action pad mask, obs pad mask)
        (0, 0): ([0, 0], [0, 1, 2], [1, 1, 1], [0, 1]),
        (0, 1): ([0, 1], [1, 2, 2], [1, 1, 0], [1, 1]),
        (0, 2): ([1, 2], [2, 2, 2], [1, 0, 0], [1, 1]),
        (1, 0): ([0, 0], [0, 1, 2], [1, 1, 1], [0, 1]),
        (1, 1): ([0, 1], [1, 2, 3], [1, 1, 1], [1, 1]),
        (1, 2): ([1, 2], [2, 3, 4], [1, 1, 1], [1, 1]),
        (1, 3): ([2, 3], [3, 4, 4], [1, 1, 0], [1, 1]),
        (1, 4): ([3, 4], [4, 4, 4], [1, 0, 0], [1, 1]),
    }
    for index, ((demo, t), (obs_steps, act_steps, act_mask, obs_mask)) in enumerate(expected.items()):
        item = data[index]
        assert item["obs"]["robot0_eef_pos"].tolist() == [[s, demo, 0] for s in obs_steps], (demo, t)
        assert item["obs"]["robot0_gripper_qpos"].shape == (2, 2)
        image = item["obs"]["agentview_image"]
        assert image.shape == (2, 3, 8, 8) and image.dtype == torch.float32
        assert torch.allclose(image[:, 0, 0, 0], torch.tensor([10 * s / 255 for s in obs_steps]))
        assert item["actions"].shape == (3, 7)
        assert item["actions"][:, 0].tolist() == [10 * demo + s for s in act_steps], (demo, t)
        assert item["pad_mask"].tolist() == [bool(m) for m in act_mask], (demo, t)
        assert item["obs_pad_mask"].tolist() == [bool(m) for m in obs_mask], (demo, t)


def test_datamodule_batches_stats_and_splits(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5", lengths=(3, 5, 4))
    with h5py.File(path, "a") as f:
        del f["mask/train"], f["mask/valid"]
        f.create_dataset("mask/train", data=np.array(["demo_0", "demo_2"], dtype="S"))
        f.create_dataset("mask/valid", data=np.array(["demo_1"], dtype="S"))
    dm = RobomimicDataModule(str(path), rgb_keys=["agentview_image"], low_dim_keys=LOW_DIM, action_dim=7, batch_size=4)
    dm.setup("fit")
    assert (dm.train_demos, dm.valid_demos) == (["demo_0", "demo_2"], ["demo_1"])
    assert dm.report().metrics == {"data/train_demos": 2, "data/valid_demos": 1, "data/train_samples": 7,
                                "data/mean_demo_length": 3.5}
    actions = np.array([0, 1, 2, 20, 21, 22, 23], dtype=np.float64)  # train demos only
    stats = dm.normalization_stats()
    assert stats["actions"]["mean"] == pytest.approx([actions.mean()] * 7)
    assert stats["actions"]["std"] == pytest.approx([actions.std()] * 7)
    assert stats["obs"]["robot0_eef_pos"]["std"][2] == 0.01  # a constant entry gets the floor, not 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["obs"]["agentview_image"].shape == (4, 1, 3, 8, 8) and batch["actions"].shape == (4, 1, 7)
    assert len(dm.val_dataloader().dataset) == 5
    assert json.loads(dm.env_args) == ENV_ARGS


def test_normalisation_round_trip_and_checkpoint(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5")
    stats = compute_stats(path, ["demo_0", "demo_1"], list(LOW_DIM))
    norm = Normalizer(stats)
    actions = torch.tensor(np.concatenate([h5py.File(path)[f"data/demo_{i}/actions"][:] for i in (0, 1)]))
    normed = norm.actions(actions)
    assert normed.mean(0)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert normed.std(0, unbiased=False)[0].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(norm.unactions(normed), actions, atol=1e-5)
    obs = {"robot0_eef_pos": torch.tensor([[[1.0, 0.0, 0.0]]]), "agentview_image": torch.ones(1, 1, 3, 8, 8)}
    out = norm.obs(obs)
    mean, std = stats["obs"]["robot0_eef_pos"]["mean"], stats["obs"]["robot0_eef_pos"]["std"]
    assert out["robot0_eef_pos"][0, 0, 0].item() == pytest.approx((1.0 - mean[0]) / std[0])
    assert out["agentview_image"] is obs["agentview_image"]  # images are not normalised here
    # the statistics travel in the checkpoint
    task = BehaviorCloning(torch.nn.Linear(1, 1))
    task.normalizer = norm
    checkpoint = {}
    task.on_save_checkpoint(checkpoint)
    restored = BehaviorCloning(torch.nn.Linear(1, 1))
    restored.on_load_checkpoint(json.loads(json.dumps(checkpoint)))
    assert restored.normalizer.stats == norm.stats


def test_missing_observation_key_lists_the_keys(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5")
    with pytest.raises(DatasetError) as err:
        inspect_hdf5(path, ["robot0_eye_in_hand_image"], LOW_DIM)
    assert str(err.value) == (
        f"{path}: observation key 'robot0_eye_in_hand_image' is not in data/demo_0/obs; the file has "
        "['agentview_image', 'robot0_eef_pos', 'robot0_gripper_qpos'] (set data.rgb_keys / data.low_dim_keys "
        "to keys that exist)")


def test_wrong_sizes_are_named(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5")
    with pytest.raises(DatasetError, match=r"'robot0_eef_pos' has 3 dimensions but data.low_dim_keys says 4: "
                                           r"set data.low_dim_keys.robot0_eef_pos=3"):
        inspect_hdf5(path, [], {"robot0_eef_pos": 4})
    with pytest.raises(DatasetError, match=r"actions have 7 dimensions but data.action_dim=4: set data.action_dim=7"):
        inspect_hdf5(path, [], LOW_DIM, action_dim=4)


def test_length_mismatch_names_the_demo(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5")
    with h5py.File(path, "a") as f:
        del f["data/demo_1/actions"]
        f.create_dataset("data/demo_1/actions", data=np.zeros((4, 7), np.float32))
    with pytest.raises(DatasetError) as err:
        inspect_hdf5(path, ["agentview_image"], LOW_DIM)
    assert str(err.value) == (
        f"{path}: demo demo_1 is inconsistent: 4 actions but obs/agentview_image has 5 steps, obs/robot0_eef_pos "
        "has 5 steps, obs/robot0_gripper_qpos has 5 steps, num_samples=5; every obs key, actions and num_samples "
        "must have one entry per step")


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m fibo.envs.demos --env lift"):
        inspect_hdf5(tmp_path / "nope.hdf5")


def test_no_mask_falls_back_to_a_seeded_split(tmp_path, caplog):
    path = write_tiny(tmp_path / "tiny.hdf5", lengths=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12), masks=False)
    info = inspect_hdf5(path, [], LOW_DIM)
    with caplog.at_level(logging.WARNING, logger="fibo"):
        train, valid = split_demos(info, "train", "valid", 0.2, seed=0, path=str(path))
    assert len(valid) == 2 and len(train) == 8 and not set(train) & set(valid)
    assert (train, valid) == split_demos(info, "train", "valid", 0.2, seed=0)  # seeded: the same split again
    assert split_demos(info, "train", "valid", 0.2, seed=1) != (train, valid)
    assert "has no mask/train filter key (it has no mask/ group): training on 8 of its 10 demos and validating on a " \
           "seeded 20% (2 demos, data.split_seed=0)" in caplog.text


def test_no_env_args_trains_but_refuses_rollouts(tmp_path, caplog):
    from types import SimpleNamespace

    from fibo.envs.evaluation import RolloutEvaluation
    from fibo.envs.sim import EnvCreationError, make_env

    path = write_tiny(tmp_path / "tiny.hdf5", env_args=False)
    dm = RobomimicDataModule(str(path), rgb_keys=[], low_dim_keys=LOW_DIM, batch_size=2)
    dm.setup("fit")
    assert dm.env_args is None and len(dm.train_set) == 3  # demo_0 (demo_1 validates)
    callback = RolloutEvaluation(num_episodes=2)
    trainer = SimpleNamespace(fast_dev_run=False, datamodule=dm, logger=None, is_global_zero=True,
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))  # one process
    with caplog.at_level(logging.WARNING, logger="fibo"):
        callback.on_fit_start(trainer, SimpleNamespace(model=None))
    assert callback.env is None
    assert f"{path} has no data.attrs['env_args'], so the environment cannot be recreated: training goes on, " \
           "rollouts are refused" in caplog.text
    with pytest.raises(EnvCreationError, match=r"has no data.attrs\['env_args'\]"):
        make_env(None, source=str(path))


def test_num_demos_is_a_seeded_nested_subset_of_the_training_demos(tmp_path):
    """data.num_demos on a file without mask/: 8 training demos, 2 validation demos (seeded)."""
    path = write_tiny(tmp_path / "tiny.hdf5", lengths=tuple(range(3, 13)), masks=False)

    def module(num_demos, split_seed=0):
        dm = RobomimicDataModule(str(path), rgb_keys=[], low_dim_keys=LOW_DIM, batch_size=2, valid_fraction=0.2,
                                 num_demos=num_demos, split_seed=split_seed)
        dm.setup("fit")
        return dm

    full = module(None)
    subsets = {n: module(n) for n in (1, 2, 4, 8)}
    assert len(full.train_demos) == 8
    for small, large in [(1, 2), (2, 4), (4, 8)]:
        assert set(subsets[small].train_demos) < set(subsets[large].train_demos)
    assert subsets[8].train_demos == full.train_demos
    assert module(4).train_demos == subsets[4].train_demos  # reproducible
    assert all(dm.valid_demos == full.valid_demos for dm in subsets.values())  # validation unchanged
    lengths = {f"demo_{i}": n for i, n in enumerate(range(3, 13))}
    four = subsets[4]
    assert four.report().metrics["data/train_demos"] == 4
    assert four.report().metrics["data/train_samples"] == sum(lengths[d] for d in four.train_demos)
    assert len(four.train_set) == sum(lengths[d] for d in four.train_demos)
    assert module(4, split_seed=1).train_demos != four.train_demos
    for bad in (0, -1, 9):
        with pytest.raises(ValueError) as info:
            module(bad)
        assert str(info.value) == (f"data.num_demos={bad} is out of range: give an integer from 1 to 8 (all 8 training "
                                   "demos), or data.num_demos=null for all")


def test_train_and_valid_masks_sharing_demos_is_an_error(tmp_path):
    path = write_tiny(tmp_path / "tiny.hdf5", lengths=(3,) * 9)
    with h5py.File(path, "a") as f:
        del f["mask/valid"]
        f.create_dataset("mask/valid", data=np.array([f"demo_{i}" for i in (8, 7, 6, 5, 4, 3, 2)], dtype="S"))
    dm = RobomimicDataModule(str(path), rgb_keys=[], low_dim_keys=LOW_DIM)
    with pytest.raises(DatasetError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        f"{path}: mask/train and mask/valid share 6 demo(s) (demo_2, demo_3, demo_4, demo_5, demo_6, ... (6 in all)), "
        "so validation would score demos seen in training: fix the file's masks so that no demo is in both, or "
        "choose other filter keys (data.train_filter / data.valid_filter; data.valid_filter=null validates on nothing)")
    with h5py.File(path, "a") as f:
        del f["mask/valid"]
        f.create_dataset("mask/valid", data=np.array(["demo_8", "demo_0"], dtype="S"))
    with pytest.raises(DatasetError, match=r"share 1 demo\(s\) \(demo_0\), so validation"):
        split_demos(inspect_hdf5(path, [], LOW_DIM), "train", "valid", 0.1, seed=0, path=str(path))


def test_bad_camera_sizes_are_refused_at_construction(tmp_path):
    for img_size, message in [
        (0, "data.img_size=0 is not a positive side in pixels: e.g. data.img_size=32"),
        (-84, "data.img_size=-84 is not a positive side in pixels: e.g. data.img_size=32"),
        ([84, 64], "data.img_size=[84, 64]: robot camera images are square (rendered img_size x img_size); give one "
                   "side in pixels, e.g. data.img_size=64"),
    ]:
        with pytest.raises(ValueError) as info:
            RobomimicDataModule(str(tmp_path / "tiny.hdf5"), img_size=img_size)
        assert str(info.value) == message


def test_a_constant_dimension_is_named_when_its_std_is_floored(tmp_path, caplog):
    """write_tiny's eef_pos z is always 0: its std (0) is floored at std_min, with one warning naming
    the key and the dimension (it was floored silently); the varying dimensions are not named."""
    path = write_tiny(tmp_path / "tiny.hdf5")
    with caplog.at_level("WARNING", logger="fibo"):
        stats = compute_stats(path, ["demo_0", "demo_1"], list(LOW_DIM), std_min=0.01)
    assert stats["obs"]["robot0_eef_pos"]["std"][2] == 0.01
    floored = [r.getMessage() for r in caplog.records if "floored" in r.getMessage()]
    assert floored == ["obs/robot0_eef_pos: std below 0.01 in dimension(s) [2] of 3 (0) over the training demos: "
                       "floored at 0.01 (data.std_min)"]
