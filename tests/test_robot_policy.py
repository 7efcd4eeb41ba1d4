"""Policies: every model config builds, runs forward and backward, and acts in an environment loop."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from fibo.models.policy import create_policy
from fibo.tasks.robot import BehaviorCloning, Normalizer

LOW_DIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def compose(tmp_path, *overrides):
    from test_config import compose_cfg

    return compose_cfg(tmp_path, ["task=robot", *overrides])


def batch_for(cfg, size=4):
    obs = {k: torch.rand(size, cfg.data.frame_stack, 3, 84, 84) for k in cfg.data.rgb_keys}
    obs.update({k: torch.randn(size, cfg.data.frame_stack, d) for k, d in cfg.data.low_dim_keys.items()})
    return obs


@pytest.mark.parametrize("name", ["policy_fibo", "policy_dense", "policy_cnn", "policy_blind", "policy_oracle"])
def test_policy_forward_backward(tmp_path, name):
    oracle = ["experiment=robot_oracle"] if name == "policy_oracle" else []  # adds the object state to the data
    cfg = compose(tmp_path, f"model={name}", *oracle, "data.seq_length=3", "data.frame_stack=2")
    policy = instantiate(cfg.model)
    obs = batch_for(cfg)
    out = policy(obs)
    assert out.shape == (4, 3, 7)
    out.pow(2).mean().backward()
    first = next(p for p in policy.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0, f"{name}: no gradient reaches the first layer"
    assert all(p.grad is not None for p in policy.parameters()), f"{name}: some parameters get no gradient"
    expected_keys = {"policy_blind": [], "policy_oracle": []}.get(name, ["agentview_image"])
    assert policy.rgb_keys == expected_keys
    assert ("object" in policy.low_dim_keys) == (name == "policy_oracle")


def test_fibottention_policy_is_sparse_and_dense_is_not(tmp_path):
    fibo = instantiate(compose(tmp_path, "model=policy_fibo").model)
    dense = instantiate(compose(tmp_path, "model=policy_dense").model)
    encoder = fibo.encoders["agentview_image"]
    assert encoder.num_patch_tokens == 100  # 76x76 crop through the conv stem: 10x10 tokens
    assert encoder.spec.name == "fibottention" and dense.encoders["agentview_image"].spec.name == "dense"
    assert 0.0 < fibo.attention_density()["density_patch"] < 0.5
    assert dense.attention_density()["density_patch"] == 1.0
    # the image matters: different images give different actions (the encoder is not bypassed)
    fibo.eval()
    obs = batch_for(compose(tmp_path, "model=policy_fibo"), size=2)
    obs = {k: v[:1].expand(2, *v.shape[1:]).clone() for k, v in obs.items()}
    obs["agentview_image"][1] = torch.rand_like(obs["agentview_image"][1])
    out = fibo(obs)
    assert not torch.allclose(out[0], out[1])


def test_patch_stem_option(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fibo.models.policy"):
        policy = instantiate(compose(tmp_path, "model=policy_fibo", "model.stem=patch", "model.patch_size=8").model)
    assert policy.encoders["agentview_image"].num_patch_tokens == 81  # floor(76 / 8) ** 2
    assert caplog.messages == ["model.stem=patch: the 76 px crop is not divisible by model.patch_size=8, so its last 4 "
                               "pixel rows and columns are not seen (9 x 9 patches)"]  # said, not silent
    caplog.clear()
    with caplog.at_level("WARNING", logger="fibo.models.policy"):
        create_policy("transformer", ["agentview_image"], LOW_DIM, 7, crop_size=76, stem="patch", patch_size=4)
    assert caplog.messages == []  # 76 = 19 x 4
    with pytest.raises(ValueError, match="model.stem='pixels' must be 'conv'"):
        create_policy("transformer", ["agentview_image"], LOW_DIM, 7, stem="pixels")


def test_random_crop_in_training_centre_crop_in_eval():
    policy = create_policy("cnn", ["agentview_image"], LOW_DIM, 7, crop_size=76)
    images = torch.arange(84.0).expand(2, 3, 84, 84).clone()  # value = column index
    policy.eval()
    assert policy.crop(images)[0, 0, 0, :3].tolist() == [4.0, 5.0, 6.0]
    policy.train()
    torch.manual_seed(0)
    starts = {int(policy.crop(images)[i, 0, 0, 0]) for i in range(2) for _ in range(10)}
    assert len(starts) > 1 and min(starts) >= 0 and max(starts) <= 8


def test_agent_stacks_frames_and_denormalises():
    policy = create_policy("none", [], LOW_DIM, 7, frame_stack=2, seq_length=3)
    task = BehaviorCloning(policy)
    mean, std = [0.5] * 7, [2.0] * 7
    task.normalizer = Normalizer({"actions": {"mean": mean, "std": std},
                                  "obs": {k: {"mean": [0.0] * d, "std": [1.0] * d} for k, d in LOW_DIM.items()}})
    seen = []
    original = policy.forward

    def spy(obs):
        seen.append({k: v.clone() for k, v in obs.items()})
        return torch.zeros(1, 3, 7) + 0.1

    policy.forward = spy
    agent = task.agent()
    agent.reset()
    steps = [{k: np.full(d, float(t)) for k, d in LOW_DIM.items()} for t in range(3)]
    actions = [agent.act(o) for o in steps]
    assert seen[0]["robot0_eef_pos"][0, :, 0].tolist() == [0.0, 0.0]  # first frame repeated, like robomimic
    assert seen[2]["robot0_eef_pos"][0, :, 0].tolist() == [1.0, 2.0]
    assert np.allclose(actions[0], 0.1 * 2.0 + 0.5)  # denormalised first action of the chunk
    policy.forward = original
    with pytest.raises(KeyError, match=r"does not provide observation\(s\) \['robot0_eef_quat'\]"):
        agent.act({"robot0_eef_pos": np.zeros(3), "robot0_gripper_qpos": np.zeros(2)})


def test_readout_options(tmp_path):
    sizes = {}
    for readout in ("cls", "keypoints", "cls_keypoints"):
        policy = instantiate(compose(tmp_path, "model=policy_fibo", f"model.readout={readout}").model)
        sizes[readout] = policy.encoders["agentview_image"].out_dim
        assert policy(batch_for(compose(tmp_path, "model=policy_fibo"))).shape == (4, 1, 7)
    assert sizes == {"cls": 96, "keypoints": 64, "cls_keypoints": 160}  # width 96, 32 keypoints x (x, y)
    with pytest.raises(ValueError, match="model.readout='mean' must be"):
        create_policy("transformer", ["agentview_image"], LOW_DIM, 7, readout="mean")


def test_reference_policies_write_no_data_keys(tmp_path):
    """policy_blind takes no camera though the data have one (the model's own rgb_keys: []);
    policy_oracle needs the data's object state, which experiment=robot_oracle adds (not the model)."""
    blind_cfg = compose(tmp_path, "model=policy_blind")
    assert list(blind_cfg.data.rgb_keys) == ["agentview_image"] and "object" not in blind_cfg.data.low_dim_keys
    blind = instantiate(blind_cfg.model)
    assert blind.rgb_keys == [] and not blind.encoders and list(blind.low_dim_keys) == list(LOW_DIM)
    assert blind(batch_for(blind_cfg)).shape == (4, 1, 7)  # the camera in the batch is not read
    with pytest.raises(Exception) as info:  # Hydra's InstantiationException around the ValueError
        instantiate(compose(tmp_path, "model=policy_oracle").model)
    assert str(info.value.__cause__) == (
        "model.object_state=true needs the object state, but data.low_dim_keys has no 'object' (it has "
        "['robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos']): run `fibo-run experiment=robot_oracle`, which "
        "adds data.low_dim_keys.object=${data.object_dim}")
    for data in ("lift", "metaworld"):
        cfg = compose(tmp_path, "experiment=robot_oracle", f"data={data}")
        assert cfg.hydra.runtime.choices.model == "policy_oracle" and list(cfg.data.rgb_keys) == []
        oracle = instantiate(cfg.model)
        assert oracle.low_dim_keys["object"] == cfg.data.object_dim == {"lift": 10, "metaworld": 35}[data]
    # a vision policy on the oracle's data leaves the object state out (only object_state=true reads it)
    fibo = instantiate(compose(tmp_path, "experiment=robot_oracle", "model=policy_fibo", "data.rgb_keys=[agentview_image]").model)
    assert "object" not in fibo.low_dim_keys and fibo.rgb_keys == ["agentview_image"]
