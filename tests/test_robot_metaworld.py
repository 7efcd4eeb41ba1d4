"""metaworld in the real simulator: corner2 images the right way up, and rollouts judged by the env's
``info['success']`` (the scripted expert succeeds, a still arm does not)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pick_place():
    from fibo.envs.demos import env_spec
    from fibo.envs.sim import make_env

    env_args, image_keys, _ = env_spec("metaworld/pick-place-v3")
    env = make_env(env_args, image_keys=image_keys)
    yield env, env_args, image_keys
    env.close()


def test_corner2_images_are_upright(pick_place):
    """corner2 is mounted upside down (its image-up axis points below the horizon): fibo turns it by 180
    degrees, so the black background (no skybox) is at the top and the table and floor at the bottom;
    a file written before (no upright_cameras) keeps the raw, upside-down image."""
    from fibo.envs.sim import make_env

    env, env_args, image_keys = pick_place
    image = env.reset(seed=3)[image_keys[0]].astype(float)
    assert env.upside_down("corner2") and not env.upside_down("topview")
    top, bottom = image[:10].mean(), image[-10:].mean()
    assert top < 20 < bottom, (top, bottom)
    old_args = {**env_args, "env_kwargs": {k: v for k, v in env_args["env_kwargs"].items() if k != "upright_cameras"}}
    old = make_env(old_args, image_keys=image_keys)
    try:
        raw = old.reset(seed=3)[image_keys[0]]
    finally:
        old.close()
    assert np.array_equal(raw[::-1, ::-1], image.astype(np.uint8))


def test_rollouts_succeed_by_the_envs_success_info(pick_place):
    from fibo.envs.experts import MetaworldExpert
    from fibo.envs.rollout import run_rollouts

    env = pick_place[0]

    class Expert:
        def __init__(self):
            self.expert = MetaworldExpert("pick-place-v3")

        def reset(self):
            self.expert.reset()

        def act(self, obs):
            return self.expert.act(obs, env)

    class Still:
        def reset(self):
            pass

        def act(self, obs):
            return np.zeros(4)

    done = run_rollouts(Expert(), env, [100000, 100001], horizon=200)
    assert done["successes"] == [True, True] and done["mean_length"] < 200
    assert env._last_info["success"] > 0.5
    still = run_rollouts(Still(), env, [100000], horizon=20)
    assert still["successes"] == [False] and still["mean_length"] == 20


def test_a_policy_without_images_films_its_rollouts_from_corner2(pick_place):
    """policy_oracle / policy_blind see no camera: the rollout video comes from the env's default camera
    (corner2 on metaworld; before: agentview, which metaworld lacks, and the run FAILED)."""
    from types import SimpleNamespace

    from fibo.envs.evaluation import RolloutEvaluation

    env_args = pick_place[1]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(env_args=env_args, path="pick_place.hdf5", img_size=84,
                                                         rollout_horizon=200))
    callback = RolloutEvaluation(num_episodes=1, video_episodes=1, video_size=32)
    env = callback.make_env(trainer, SimpleNamespace(model=SimpleNamespace(rgb_keys=[])))
    try:
        assert callback._camera == "corner2" and env.image_keys == []
        frame = env.render(callback._camera, 32)
        assert frame.shape == (32, 32, 3) and frame[:3].mean() < 20 < frame[-3:].mean()  # upright, as the demos
    finally:
        env.close()
