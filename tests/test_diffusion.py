"""Diffusion-policy head (fibo.models.diffusion, model/head=diffusion): diffusers' schedulers round trip,
the U-Net's shapes and horizon rule, EMA weights being the evaluated ones, the receding-horizon agent,
the head configs and their one-line errors. Tiny sizes (no simulator): the real runs are in experiments/."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from fibo.models.diffusion import ConditionalUnet1D, DiffusionHead
from fibo.models.policy import BCPolicy, DiffusionPolicy, create_policy
from fibo.tasks.robot import BehaviorCloning, Normalizer

LOW_DIM = {"robot0_eef_pos": 3, "robot0_gripper_qpos": 2}


def compose(tmp_path, *overrides):
    from test_config import compose_cfg

    return compose_cfg(tmp_path, ["task=robot", *overrides])


def tiny_head(**kwargs):
    return DiffusionHead(action_dim=3, horizon=8, cond_dim=5, down_dims=(16, 32), step_embed_dim=16, **kwargs)


def identity_stats(action_dim=7, low=-2.0, high=2.0):
    return {"actions": {"mean": [0.0] * action_dim, "std": [1.0] * action_dim, "min": [low] * action_dim,
                        "max": [high] * action_dim},
            "obs": {k: {"mean": [0.0] * d, "std": [1.0] * d} for k, d in LOW_DIM.items()}}


# ---- schedulers -------------------------------------------------------------------------------------

def test_noise_added_then_removed_at_t0_recovers_the_chunk():
    """DDPM (training schedule): the chunk noised at t=0, then one reverse step given the true noise,
    is the chunk again; at a later step the noised chunk is far from it (the noise is really added)."""
    head = tiny_head()
    generator = torch.Generator().manual_seed(0)
    chunk = torch.rand(4, 8, 3, generator=generator) * 1.8 - 0.9  # inside [-1, 1] (clip_sample)
    noise = torch.randn(4, 8, 3, generator=generator)
    at = lambda t: torch.full((4,), t, dtype=torch.long)  # noqa: E731
    noisy = head.train_scheduler.add_noise(chunk, noise, at(0))
    assert 0 < (noisy - chunk).abs().max() < 0.1  # t=0 adds a little noise
    assert (head.train_scheduler.add_noise(chunk, noise, at(99)) - chunk).abs().mean() > 0.5
    recovered = head.train_scheduler.step(noise, 0, noisy).prev_sample
    assert torch.allclose(recovered, chunk, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddim_sampling_with_an_oracle_denoiser_returns_the_chunk(prediction_type):
    """The few-step DDIM sampler (inference) run from pure noise with a denoiser that knows the clean
    chunk (returns the exact noise, or the chunk) ends on the chunk: the sampling loop, its timesteps
    and the final step are right."""
    head = tiny_head(num_inference_steps=4, prediction_type=prediction_type)
    chunk = torch.linspace(-0.9, 0.9, 2 * 8 * 3).reshape(2, 8, 3)
    alphas = head.train_scheduler.alphas_cumprod
    calls = []

    def oracle(x, t, cond):
        calls.append(int(t))
        if prediction_type == "sample":
            return chunk
        a = alphas[int(t)]
        return (x - a.sqrt() * chunk) / (1 - a).sqrt()

    out = head.sample(torch.zeros(2, 5), generator=torch.Generator().manual_seed(0), denoiser=oracle)
    assert len(calls) == 4 and calls == sorted(calls, reverse=True) and calls[-1] == 0
    assert torch.allclose(out, chunk, atol=1e-4)
    assert isinstance(head.train_scheduler, __import__("diffusers").DDPMScheduler)
    assert isinstance(head.sampler, __import__("diffusers").DDIMScheduler)


def test_sampling_is_seeded_by_the_generator():
    head = tiny_head().eval()
    cond = torch.randn(2, 5)
    a, b = (head.sample(cond, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    c = head.sample(cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c) and a.shape == (2, 8, 3)


def test_unet_shapes_gradients_and_horizon_rule():
    unet = ConditionalUnet1D(action_dim=3, cond_dim=5, down_dims=(16, 32, 64), step_embed_dim=16)
    x = torch.randn(2, 8, 3)
    out = unet(x, torch.tensor([0, 50]), torch.randn(2, 5))
    assert out.shape == (2, 8, 3) and unet.horizon_multiple == 4
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters())
    assert unet(x, 7, torch.randn(2, 5)).shape == (2, 8, 3)  # a scalar step for the whole batch
    with pytest.raises(ValueError) as info:
        DiffusionHead(action_dim=3, horizon=6, cond_dim=5, down_dims=(16, 32, 64))
    assert str(info.value) == ("the diffusion horizon, 6 actions per prediction (data.seq_length, by default "
                               "model.head.horizon), is not a multiple of 4 (the U-Net halves it 2 times: "
                               "model.head.down_dims has 3 levels): set model.head.horizon=4 or 8 or use fewer "
                               "model.head.down_dims")
    with pytest.raises(ValueError, match=r"model.head.num_inference_steps=0 must be between 1 and "):
        tiny_head(num_inference_steps=0)


# ---- configs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["policy_fibo", "policy_dense", "policy_cnn", "policy_blind"])
def test_every_encoder_takes_the_diffusion_head(tmp_path, model):
    cfg = compose(tmp_path, f"model={model}", "model/head=diffusion", "model.head.down_dims=[16,32]")
    assert (cfg.data.frame_stack, cfg.data.seq_length, cfg.model.head.n_action_steps) == (2, 16, 8)
    assert cfg.task.ema == {"decay": 0.9999, "power": 0.75}
    policy = instantiate(cfg.model)
    assert isinstance(policy, DiffusionPolicy) and policy.action_normalization == "limits"
    obs = {k: torch.rand(2, 2, 3, 84, 84) for k in policy.rgb_keys}
    obs.update({k: torch.randn(2, 2, d) for k, d in policy.low_dim_keys.items()})
    loss = policy.compute_loss(obs, torch.rand(2, 16, 7) * 2 - 1)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in policy.parameters())
    policy.eval()
    assert policy.predict(obs, generator=torch.Generator().manual_seed(0)).shape == (2, 16, 7)


def test_bc_stays_the_default_and_chunks_with_its_horizon(tmp_path):
    cfg = compose(tmp_path)
    assert cfg.model.head.name == "bc" and cfg.task.ema is None
    assert (cfg.data.frame_stack, cfg.data.seq_length) == (1, 1)
    chunked = compose(tmp_path, "model.head.horizon=8", "model.head.n_action_steps=4")
    assert (chunked.data.frame_stack, chunked.data.seq_length) == (1, 8)
    policy = instantiate(chunked.model)
    assert isinstance(policy, BCPolicy) and (policy.seq_length, policy.n_action_steps) == (8, 4)
    assert policy({k: torch.rand(2, 1, 3, 84, 84) for k in policy.rgb_keys} |
                  {k: torch.randn(2, 1, d) for k, d in policy.low_dim_keys.items()}).shape == (2, 8, 7)
    assert compose(tmp_path, "model.head.horizon=8", "data.seq_length=4").data.seq_length == 4  # data.* still wins


def test_n_action_steps_above_the_horizon_is_one_line(tmp_path):
    cfg = compose(tmp_path, "model/head=diffusion", "model.head.n_action_steps=20")
    with pytest.raises(Exception) as info:  # Hydra's InstantiationException around the ValueError
        instantiate(cfg.model)
    assert str(info.value.__cause__) == (
        "model.head.n_action_steps=20 is larger than the horizon, 16 actions per prediction (data.seq_length, by "
        "default model.head.horizon): set model.head.n_action_steps<=16 or model.head.horizon>=20")
    with pytest.raises(ValueError, match=r"^model.head.n_action_steps=0 must be a positive integer"):
        create_policy("none", [], LOW_DIM, 7, head={"name": "bc", "n_action_steps": 0})
    with pytest.raises(ValueError) as info:
        create_policy("none", [], LOW_DIM, 7, head="diffusion")
    assert str(info.value) == ("model.head='diffusion' replaced the head's config by a string: choose the head with "
                               "model/head=diffusion (a config group: a slash, not a dot)")


# ---- EMA --------------------------------------------------------------------------------------------

def test_ema_weights_are_the_ones_evaluated(tmp_path):
    """A few Lightning steps on a tiny file: the EMA copy moved (it is neither the initial weights nor
    the trained ones), validation and the rollout agent use it, and the checkpoint holds it."""
    import lightning as L

    from fibo.data.robomimic import RobomimicDataModule
    from test_robot_data import write_tiny

    path = write_tiny(tmp_path / "tiny.hdf5", lengths=(6, 6, 5), image=False)
    dm = RobomimicDataModule(str(path), rgb_keys=[], low_dim_keys=LOW_DIM, frame_stack=2, seq_length=4, batch_size=4)
    torch.manual_seed(0)
    policy = create_policy("none", [], LOW_DIM, 7, frame_stack=2, seq_length=4,
                           head={"name": "diffusion", "n_action_steps": 2, "down_dims": [16, 32], "step_embed_dim": 16})
    task = BehaviorCloning(policy, lr=1e-2, warmup_epochs=0, ema={"decay": 0.5, "power": 0.75})
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 6  # 12 training windows / batch 4, 2 epochs
    ema = task.ema.module
    assert ema is not policy and task.eval_model is ema
    name = "diffusion.unet.final.1.weight"
    trained, averaged, start = policy.state_dict()[name], ema.state_dict()[name], initial[name]
    assert not torch.allclose(averaged, trained) and not torch.allclose(averaged, start)
    assert (averaged - start).norm() < (trained - start).norm()  # an average lags behind the weights
    assert all(not p.requires_grad for p in ema.parameters())
    agent = task.agent()
    assert agent.policy is ema
    # the agent's chunk is the EMA weights' sample (same noise), not the training weights'
    obs = {k: torch.zeros(1, 2, d) for k, d in LOW_DIM.items()}
    agent.reset()
    for _ in range(2):
        agent.history.append({k: np.zeros(d) for k, d in LOW_DIM.items()})
    chunk = agent.predict_chunk()
    normed = task.normalizer.obs(obs)
    expect_ema = task.normalizer.unactions(ema.eval().predict(normed, generator=torch.Generator().manual_seed(0)))
    expect_raw = task.normalizer.unactions(policy.eval().predict(normed, generator=torch.Generator().manual_seed(0)))
    assert np.allclose(chunk, expect_ema[0].numpy(), atol=1e-5)
    assert not np.allclose(chunk, expect_raw[0].numpy(), atol=1e-3)
    # validation scores the EMA weights
    task.eval_model.eval()
    state = task.state_dict()
    assert any(k.startswith("ema.module.") for k in state) and torch.equal(state[f"ema.module.{name}"], averaged)


def test_ema_options_are_checked():
    with pytest.raises(ValueError) as info:
        BehaviorCloning(create_policy("none", [], LOW_DIM, 7), ema={"decay": 1.5})
    assert str(info.value) == ("model.head.ema: decay=1.5 must be in (0, 1) and power=0.75 > 0 (e.g. decay 0.9999, "
                               "power 0.75)")


# ---- the receding-horizon agent ---------------------------------------------------------------------

class ChunkSpy:
    """Stands in for ``policy.predict``: records the histories, returns chunks whose action j of
    prediction p is ``p + j / 10`` (normalised units) in every dimension."""

    def __init__(self, horizon):
        self.horizon, self.seen = horizon, []

    def __call__(self, obs, generator=None):
        self.seen.append({k: v.clone() for k, v in obs.items()})
        p = len(self.seen) - 1
        return (p + torch.arange(self.horizon) / 10.0)[None, :, None].expand(1, self.horizon, 7).clone()


@pytest.mark.parametrize("head", ["bc", "diffusion"])
def test_receding_horizon_agent(head):
    """horizon 4, n_action_steps 3, 2 observations: one prediction per 3 env steps, executing the chunk's
    first 3 actions in order; the history at step 0 is the first observation twice (padded like the
    training windows); reset() starts a new chunk and history."""
    extra = {"down_dims": [16, 32], "step_embed_dim": 16} if head == "diffusion" else {}
    policy = create_policy("none", [], LOW_DIM, 7, frame_stack=2, seq_length=4,
                           head={"name": head, "n_action_steps": 3, **extra})
    task = BehaviorCloning(policy)
    task.normalizer = Normalizer(identity_stats(), actions=policy.action_normalization)  # limits: x -> 2x
    spy = ChunkSpy(4)
    policy.predict = spy
    agent = task.agent()
    agent.reset()
    steps = [{k: np.full(d, float(t)) for k, d in LOW_DIM.items()} for t in range(7)]
    actions = [agent.act(o) for o in steps]
    assert agent.predictions == len(spy.seen) == 3  # at env steps 0, 3, 6
    assert spy.seen[0]["robot0_eef_pos"][0, :, 0].tolist() == [0.0, 0.0]  # step 0: the first observation twice
    assert spy.seen[1]["robot0_eef_pos"][0, :, 0].tolist() == [2.0, 3.0]
    assert spy.seen[2]["robot0_eef_pos"][0, :, 0].tolist() == [5.0, 6.0]
    scale = 2.0 if head == "diffusion" else 1.0  # limits [-2, 2] -> [-1, 1]; gaussian mean 0 std 1
    executed = [a[0] / scale for a in actions]
    expected = [0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 2.0]
    assert np.allclose(executed, [min(e, 1 / scale) for e in expected])  # clipped to [-1, 1] after denormalising
    agent.reset()
    agent.act(steps[4])
    assert agent.predictions == 4 and spy.seen[3]["robot0_eef_pos"][0, :, 0].tolist() == [4.0, 4.0]


def test_agent_noise_is_paired_across_evaluations():
    """Episode i of every evaluation draws its sampling noise from agent_seed + i: two agents (two
    evaluations) act identically episode by episode, and episodes differ from each other."""
    torch.manual_seed(0)
    policy = create_policy("none", [], LOW_DIM, 7, frame_stack=1, seq_length=4,
                           head={"name": "diffusion", "n_action_steps": 4, "down_dims": [16, 32], "step_embed_dim": 16})
    task = BehaviorCloning(policy, agent_seed=5)
    task.normalizer = Normalizer(identity_stats(low=-0.5, high=0.5), actions="limits")
    obs = {k: np.zeros(d) for k, d in LOW_DIM.items()}

    def evaluation():
        agent = task.agent()
        out = []
        for _ in range(2):
            agent.reset()
            out.append(agent.act(obs))
        return out

    first, second = evaluation(), evaluation()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.allclose(first[0], first[1])
