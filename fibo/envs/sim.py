"""Environments recreated from a dataset's ``env_args`` (robomimic's metadata:
``{"env_name", "type", "env_kwargs"}``), with one interface for demos and rollouts:

``reset(seed) -> obs``, ``step(action) -> (obs, reward, done, info)``, ``is_success()``,
``get_state()``, ``render(camera)``; observations are dicts with robomimic's key names
(``robot0_eef_pos``, ``robot0_eef_quat``, ``robot0_gripper_qpos``, ``object``, ``<camera>_image``).

Robosuite environments are built with ``robosuite.make`` directly (robomimic 0.3.0's wrapper imports
``mujoco_py``, which robosuite 1.5 no longer has) and rendered by :class:`~fibo.envs.render.CameraRenderer`
(robosuite's own camera observations are switched off). Metaworld tasks use ``type: 2`` and an
``env_name`` of the form ``metaworld/<task>``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import fibo.envs  # noqa: F401  (MUJOCO_GL)

log = logging.getLogger("fibo")

ROBOSUITE_TYPE = 1  # robomimic.envs.env_base.EnvType
GYM_TYPE = 2
IMAGE_SUFFIX = "_image"


class EnvCreationError(RuntimeError):
    """The environment described by a dataset's ``env_args`` cannot be built here."""


def camera_of(image_key: str) -> str:
    """``agentview_image`` -> ``agentview`` (robomimic names camera observations ``<camera>_image``)."""
    if not image_key.endswith(IMAGE_SUFFIX):
        raise ValueError(f"image observation key {image_key!r} does not end in {IMAGE_SUFFIX!r} "
                         f"(robomimic names them <camera>_image, e.g. agentview_image)")
    return image_key[: -len(IMAGE_SUFFIX)]


def parse_env_args(env_args: str | Mapping[str, Any] | None, source: str = "the dataset") -> dict:
    """``env_args`` as a dict; raises a clear error when they are missing or malformed."""
    if env_args is None or env_args == "":
        raise EnvCreationError(
            f"{source} has no data.attrs['env_args'], so the environment cannot be recreated and rollouts "
            f"are refused (training itself works: set callbacks.rollout=null, or write env_args into the "
            f"file as robomimic does: JSON {{'env_name', 'type', 'env_kwargs'}})"
        )
    if isinstance(env_args, (bytes, str)):
        try:
            env_args = json.loads(env_args)
        except json.JSONDecodeError as err:
            raise EnvCreationError(f"env_args of {source} is not valid JSON ({err})") from None
    env_args = dict(env_args)
    for key in ("env_name", "type", "env_kwargs"):
        if key not in env_args:
            raise EnvCreationError(f"env_args of {source} lack {key!r} (have {sorted(env_args)})")
    return env_args


def make_env(env_args: str | Mapping[str, Any] | None, image_keys: Sequence[str] = (), image_size: int | None = None,
             source: str = "the dataset"):
    """Build the environment that ``env_args`` describe, rendering ``image_keys`` (``<camera>_image``)
    at ``image_size`` (default: the size in ``env_kwargs`` or 84).

    Raises:
        EnvCreationError: missing/malformed env_args, unknown type or env name, or the simulator
            refusing the keyword arguments (the message names the env and the reason).
    """
    args = parse_env_args(env_args, source)
    name, kind = args["env_name"], args["type"]
    try:
        if kind == ROBOSUITE_TYPE:
            return RobosuiteEnv(name, args["env_kwargs"], image_keys, image_size)
        if kind == GYM_TYPE and str(name).startswith("metaworld/"):
            return MetaworldEnv(name, args["env_kwargs"], image_keys, image_size)
    except EnvCreationError:
        raise
    except Exception as err:  # noqa: BLE001 - simulators raise anything on bad kwargs
        raise EnvCreationError(f"cannot create environment {name!r} (type {kind}) from env_args of {source}: "
                               f"{type(err).__name__}: {err}") from err
    raise EnvCreationError(f"cannot create environment {name!r} of type {kind!r} from env_args of {source}: fibo "
                           f"supports robosuite (type {ROBOSUITE_TYPE}) and metaworld (type {GYM_TYPE}, "
                           f"env_name 'metaworld/<task>')")


def _controller_config(config: Mapping[str, Any] | None, robots) -> dict:
    """robosuite >= 1.5 wants a composite controller config; robomimic's official datasets (robosuite
    1.2-1.4) store a part config such as ``{"type": "OSC_POSE", ...}``: convert it."""
    if not config:
        return single_arm_controller_config()
    config = copy.deepcopy(dict(config))
    if "body_parts" in config:
        return config
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    robot = robots[0] if isinstance(robots, (list, tuple)) else robots
    return refactor_composite_controller_config(config, robot, ["right"])


def single_arm_controller_config() -> dict:
    """robosuite's default (BASIC) composite config reduced to one arm ("right": OSC_POSE + gripper),
    so that a single-arm robot does not warn about body parts it lacks at every reset."""
    from robosuite.controllers import load_composite_controller_config

    config = load_composite_controller_config(controller="BASIC")
    config["body_parts"] = {"right": config["body_parts"]["right"]}
    return config


def _import_robosuite():
    import logging

    import robosuite

    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    return robosuite


class RobosuiteEnv:
    """A robosuite environment with fibo's rendering and robomimic's observation names."""

    #: the camera of rollout videos when the policy sees no image (policy_blind / policy_oracle): robomimic's front camera
    default_camera = "agentview"

    #: robosuite keys renamed as robomimic's wrapper does
    RENAME = {"object-state": "object"}

    def __init__(self, env_name: str, env_kwargs: Mapping[str, Any], image_keys: Sequence[str] = (),
                 image_size: int | None = None) -> None:
        robosuite = _import_robosuite()
        kwargs = copy.deepcopy(dict(env_kwargs))
        size = image_size or int(kwargs.get("camera_heights", 84) if not isinstance(kwargs.get("camera_heights"), list)
                                 else kwargs["camera_heights"][0])
        for key in ("has_renderer", "has_offscreen_renderer", "use_camera_obs", "render_gpu_device_id",
                    "camera_names", "camera_heights", "camera_widths", "camera_depths", "camera_segmentations",
                    "lite_physics", "env_name"):
            kwargs.pop(key, None)
        kwargs["controller_configs"] = _controller_config(kwargs.get("controller_configs"), kwargs.get("robots", "Panda"))
        kwargs.update(has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False, ignore_done=True,
                      hard_reset=False)
        self.env_name = env_name
        self.env = robosuite.make(env_name, **kwargs)
        self.image_keys = list(image_keys)
        self.cameras = [camera_of(k) for k in self.image_keys]
        self.image_size = size
        self._renderers: dict[int, object] = {}
        self.action_dim = int(self.env.action_dim)

    # -- rendering ----------------------------------------------------------------------------
    def _model(self):
        return self.env.sim.model._model

    def render(self, camera: str, size: int | None = None) -> np.ndarray:
        """``(size, size, 3)`` uint8 image of ``camera`` (one renderer per size, rebuilt if the model changes)."""
        from fibo.envs.render import CameraRenderer

        size = size or self.image_size
        renderer = self._renderers.get(size)
        if renderer is None or renderer.model is not self._model():
            if renderer is not None:
                renderer.close()
            renderer = self._renderers[size] = CameraRenderer(self._model(), size, size)
        return renderer.render(self.env.sim.data._data, camera)

    # -- episode ------------------------------------------------------------------------------
    def _obs(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        obs = {self.RENAME.get(k, k): np.asarray(v) for k, v in raw.items()}
        for key, cam in zip(self.image_keys, self.cameras):
            obs[key] = self.render(cam)
        return obs

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Reset; ``seed`` fixes the initial object placement (same seed, same placement)."""
        if seed is not None:  # robosuite >= 1.5 draws placements and joint noise from these generators only
            rng = np.random.default_rng(seed)
            self.env.rng = rng
            sampler = getattr(self.env, "placement_initializer", None)
            if sampler is not None and hasattr(sampler, "rng"):
                sampler.rng = rng
        return self._obs(self.env.reset())

    def step(self, action: np.ndarray):
        raw, reward, done, info = self.env.step(np.asarray(action, dtype=np.float64))
        return self._obs(raw), float(reward), bool(done), info

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def get_state(self) -> np.ndarray:
        return np.asarray(self.env.sim.get_state().flatten())

    def object_position(self) -> np.ndarray:
        """Position of the task object (for scripted experts)."""
        return np.array(self.env.sim.data.body_xpos[self.env.cube_body_id])

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        self.env.close()


class MetaworldEnv:
    """A metaworld task (``env_name='metaworld/<task>'``) with a fixed-goal placement per seed.

    Observations: ``robot0_eef_pos`` (hand position), ``robot0_gripper_qpos`` (gripper opening),
    ``object`` (the rest of metaworld's 39-d state: object poses and goal), ``<camera>_image``.

    Camera images: metaworld's ``corner`` / ``corner2`` / ``corner4`` cameras are mounted upside down
    (their image-up axis points below the horizon: the table at the top of the picture, the floor
    above it). With ``env_kwargs["upright_cameras"]`` (what :func:`fibo.envs.demos.write_demos`
    records since it was checked) such a camera's image is turned by 180 degrees (the camera rolled
    upright: not mirrored); files written before keep their upside-down images in demos and rollouts
    alike (one warning).
    """

    #: the camera of rollout videos when the policy sees no image (policy_blind / policy_oracle): the camera data=metaworld trains on
    default_camera = "corner2"

    def __init__(self, env_name: str, env_kwargs: Mapping[str, Any], image_keys: Sequence[str] = (),
                 image_size: int | None = None) -> None:
        import metaworld

        self.task = env_name.split("/", 1)[1]
        self.env_name = env_name
        self.kwargs = dict(env_kwargs)
        benchmark = metaworld.MT1(self.task, seed=int(self.kwargs.get("benchmark_seed", 0)))
        self.env = benchmark.train_classes[self.task]()
        self.tasks = benchmark.train_tasks
        self.env.set_task(self.tasks[0])
        self.env.max_path_length = int(self.kwargs.get("max_path_length", 500))
        self.image_keys = list(image_keys)
        self.cameras = [camera_of(k) for k in self.image_keys]
        self.image_size = image_size or int(self.kwargs.get("camera_heights", 84))
        self._renderers: dict[int, object] = {}
        self.action_dim = int(self.env.action_space.shape[0])
        self._last_info: dict = {}
        self._raw = None
        self.upright = bool(self.kwargs.get("upright_cameras", False))
        if not self.upright and self.image_keys:
            log.warning("%s: env_args without upright_cameras (demos written before fibo turned metaworld's "
                        "upside-down cameras): images stay as the file has them (regenerate the demos for upright "
                        "ones)", env_name)

    def upside_down(self, camera: str) -> bool:
        """Whether ``camera``'s image-up axis points below the horizon (in the current state)."""
        import mujoco

        cid = mujoco.mj_name2id(self.env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cid < 0:
            raise ValueError(f"camera {camera!r} is not in the {self.env_name} model")
        return bool(self.env.data.cam_xmat[cid].reshape(3, 3)[2, 1] < 0)

    def render(self, camera: str, size: int | None = None) -> np.ndarray:
        """``(size, size, 3)`` uint8 image of ``camera``, turned upright if ``upright_cameras``."""
        from fibo.envs.render import CameraRenderer

        size = size or self.image_size
        if size not in self._renderers:
            self._renderers[size] = CameraRenderer(self.env.model, size, size)
        image = self._renderers[size].render(self.env.data, camera)
        if self.upright and self.upside_down(camera):
            image = np.ascontiguousarray(image[::-1, ::-1])
        return image

    def _obs(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        raw = np.asarray(raw, dtype=np.float64)
        self._raw = raw
        obs = {"robot0_eef_pos": raw[:3], "robot0_gripper_qpos": raw[3:4], "object": raw[4:]}
        for key, cam in zip(self.image_keys, self.cameras):
            obs[key] = self.render(cam)
        return obs

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self.env.set_task(self.tasks[seed % len(self.tasks)])
            raw, _ = self.env.reset(seed=seed)
        else:
            raw, _ = self.env.reset()
        self._last_info = {}
        return self._obs(raw)

    def step(self, action: np.ndarray):
        raw, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        self._last_info = info
        return self._obs(raw), float(reward), bool(terminated), info

    def is_success(self) -> bool:
        return bool(self._last_info.get("success", 0.0) > 0.5)

    def get_state(self) -> np.ndarray:
        return np.concatenate([self.env.data.qpos.ravel(), self.env.data.qvel.ravel()]).copy()

    @property
    def raw_observation(self) -> np.ndarray:
        return self._raw

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        self.env.close()
