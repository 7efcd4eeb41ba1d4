"""Write scripted demonstrations in robomimic's HDF5 layout.

    python -m fibo.envs.demos --env lift --num-demos 100 --out data/robot/lift.hdf5
    python -m fibo.envs.demos --env metaworld/pick-place-v3 --num-demos 50 --out data/robot/pick_place.hdf5

Layout (exactly robomimic's): ``data/demo_i/{obs/<key>, next_obs/<key>, actions, rewards, dones,
states}`` with ``demo_i.attrs["num_samples"]``, ``data.attrs["total"]``, ``data.attrs["env_args"]``
(JSON ``{"env_name", "type", "env_kwargs"}``) and the filter keys ``mask/train``, ``mask/valid``.
Observations: ``<camera>_image`` (uint8 HxWx3), ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos`` and ``object``. With ``--noise s`` the executed arm action is the expert's plus
N(0, s^2) noise while the recorded action stays the expert's (wider state coverage). Only successful
episodes are kept; the file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import fibo.envs  # noqa: F401  (MUJOCO_GL)

#: short names -> (env_args, max steps per episode)
LIFT = "lift"


def lift_env_args(image_size: int = 84, cameras=("agentview",)) -> dict:
    """robosuite Lift with a Panda and the default OSC_POSE arm controller, as robomimic stores it."""
    from fibo.envs.sim import _import_robosuite, single_arm_controller_config

    robosuite = _import_robosuite()

    return {
        "env_name": "Lift",
        "type": 1,
        "env_version": robosuite.__version__,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": single_arm_controller_config(),
            "control_freq": 20,
            "reward_shaping": False,
            "use_object_obs": True,
            "camera_names": list(cameras),
            "camera_heights": image_size,
            "camera_widths": image_size,
        },
    }


def metaworld_env_args(task: str, image_size: int = 84, cameras=("corner2",)) -> dict:
    """``upright_cameras``: images of metaworld's cameras that are mounted upside down (``corner``,
    ``corner2``...: their image-up axis points below the horizon) are turned by 180 degrees
    (:class:`fibo.envs.sim.MetaworldEnv`); recorded so that rollouts see what the demos saw."""
    return {"env_name": f"metaworld/{task}", "type": 2,
            "env_kwargs": {"camera_names": list(cameras), "camera_heights": image_size, "camera_widths": image_size,
                           "max_path_length": 500, "benchmark_seed": 0, "upright_cameras": True}}


def env_spec(env: str, image_size: int = 84) -> tuple[dict, list[str], int]:
    """(env_args, image keys, max steps) for a short env name: ``lift`` or ``metaworld/<task>``."""
    if env == LIFT:
        return lift_env_args(image_size), ["agentview_image"], 120
    if env.startswith("metaworld/"):
        return metaworld_env_args(env.split("/", 1)[1], image_size), ["corner2_image"], 200
    raise ValueError(f"unknown demo environment {env!r}: use 'lift' or 'metaworld/<task>' (e.g. metaworld/pick-place-v3)")


def make_expert(env: str):
    from fibo.envs.experts import LiftExpert, MetaworldExpert

    return LiftExpert() if env == LIFT else MetaworldExpert(env.split("/", 1)[1])


def record_episode(env, expert, seed: int, max_steps: int, noise: float, rng: np.random.Generator) -> dict | None:
    """One expert episode from ``seed``; ``None`` if it did not succeed within ``max_steps``.
    Ends at the first successful step (as robomimic's proficient-human demos do)."""
    expert.reset()
    obs = env.reset(seed=seed)
    steps: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "states": []}
    for _ in range(max_steps):
        action = expert.act(obs, env)
        executed = action.copy()
        if noise > 0:
            executed[:-1] = np.clip(executed[:-1] + rng.normal(0.0, noise, size=len(executed) - 1), -1.0, 1.0)
        steps["states"].append(env.get_state())
        steps["obs"].append(obs)
        obs, reward, _, _ = env.step(executed)
        steps["actions"].append(action)
        steps["rewards"].append(reward)
        if env.is_success():
            steps["final_obs"] = obs
            return steps
    return None


def _write_demo(group, steps: dict, obs_keys: list[str]) -> int:
    n = len(steps["actions"])
    obs_seq = steps["obs"] + [steps["final_obs"]]
    for key in obs_keys:
        values = np.stack([np.asarray(o[key]) for o in obs_seq])
        # one chunk per frame: training reads single frames at random (a chunk spanning frames would be
        # decompressed whole for each of them)
        kwargs = ({"compression": "gzip", "compression_opts": 4, "chunks": (1, *values.shape[1:])}
                  if values.dtype == np.uint8 else {})
        group.create_dataset(f"obs/{key}", data=values[:-1], **kwargs)
        group.create_dataset(f"next_obs/{key}", data=values[1:], **kwargs)
    group.create_dataset("actions", data=np.asarray(steps["actions"], dtype=np.float32))
    group.create_dataset("rewards", data=np.asarray(steps["rewards"], dtype=np.float32))
    dones = np.zeros(n, dtype=np.int64)
    dones[-1] = 1
    group.create_dataset("dones", data=dones)
    group.create_dataset("states", data=np.asarray(steps["states"], dtype=np.float64))
    group.attrs["num_samples"] = n
    return n


def check_demo_options(num_demos: int, noise: float, image_size: int, valid_fraction: float,
                       max_attempts: int | None) -> None:
    """Raises ``ValueError`` naming the first option of :func:`write_demos` out of its range."""
    problems = [(num_demos < 1, f"num_demos={num_demos}: at least 1 demo"),
                (noise < 0, f"noise={noise}: the action noise std must be >= 0"),
                (image_size < 1, f"image_size={image_size}: at least 1 pixel"),
                (not 0 <= valid_fraction < 1, f"valid_fraction={valid_fraction}: in [0, 1)"),
                (max_attempts is not None and max_attempts < num_demos,
                 f"max_attempts={max_attempts}: at least num_demos={num_demos}")]
    for bad, message in problems:
        if bad:
            raise ValueError(f"demos: {message}")


def valid_count(num_demos: int, valid_fraction: float) -> int:
    """How many of ``num_demos`` demos :func:`write_demos` puts in ``mask/valid`` (at least one when
    ``valid_fraction`` > 0 and there are two demos or more); the rest are ``mask/train``."""
    return max(1, int(round(valid_fraction * num_demos))) if num_demos > 1 and valid_fraction > 0 else 0


def write_demos(out: str | os.PathLike, env: str = LIFT, num_demos: int = 100, noise: float = 0.1, seed: int = 0,
                image_size: int = 84, valid_fraction: float = 0.1, max_attempts: int | None = None,
                progress: bool = True) -> dict:
    """Generate ``num_demos`` successful demos of ``env`` into ``out`` (robomimic HDF5).

    Episode ``k`` starts from seed ``seed * 1_000_003 + k`` (rollout evaluation uses a disjoint
    seed range). Returns ``{"path", "demos", "attempts", "samples", "seconds"}``.

    Raises:
        ValueError: ``num_demos`` < 1, ``noise`` < 0, ``image_size`` < 1, ``valid_fraction`` outside
            [0, 1) or ``max_attempts`` < ``num_demos`` (one line naming the option).
        RuntimeError: fewer than ``num_demos`` successes within ``max_attempts`` (default 2x).
    """
    check_demo_options(num_demos, noise, image_size, valid_fraction, max_attempts)
    import h5py
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fibo.envs.sim import make_env

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env_args, image_keys, max_steps = env_spec(env, image_size)
    sim = make_env(env_args, image_keys=image_keys, image_size=image_size, source=f"fibo's {env} demos")
    expert = make_expert(env)
    rng = np.random.default_rng(seed)
    max_attempts = max_attempts or 2 * num_demos
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    start, kept, attempts, total = time.time(), 0, 0, 0
    try:
        with h5py.File(tmp, "w") as f, Progress(TextColumn("[bold]demos {task.description}"), BarColumn(),
                                                 MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                                                 TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task(env, total=num_demos, note="")
            data = f.create_group("data")
            obs_keys = None
            while kept < num_demos and attempts < max_attempts:
                steps = record_episode(sim, expert, seed * 1_000_003 + attempts, max_steps, noise, rng)
                attempts += 1
                if steps is not None:
                    if obs_keys is None:
                        obs_keys = sorted(k for k in steps["obs"][0] if k in set(image_keys) | {
                            "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"})
                    total += _write_demo(data.create_group(f"demo_{kept}"), steps, obs_keys)
                    kept += 1
                bar.update(task, completed=kept, note=f"{kept}/{attempts} succeeded")
            if kept < num_demos:
                raise RuntimeError(f"the {env} expert succeeded in only {kept} of {attempts} episodes; "
                                   f"{num_demos} demos were asked (lower --noise or raise --max-attempts)")
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["fibo_generator"] = json.dumps({"env": env, "num_demos": num_demos, "noise": noise,
                                                       "seed": seed, "image_size": image_size})
            names = [f"demo_{i}" for i in range(kept)]
            order = np.random.default_rng(seed).permutation(kept)
            n_valid = valid_count(kept, valid_fraction)
            valid = sorted(names[i] for i in order[:n_valid])
            train = [n for n in names if n not in set(valid)]
            f.create_dataset("mask/train", data=np.array(train, dtype="S"))
            f.create_dataset("mask/valid", data=np.array(valid, dtype="S"))
        tmp.replace(out)
    finally:
        sim.close()
        if tmp.exists():
            tmp.unlink()
    report = {"path": str(out), "demos": kept, "attempts": attempts, "samples": total,
              "seconds": round(time.time() - start, 1)}
    print(f"fibo: kept {kept} successful {env} demos of {attempts} attempts ({total} steps) in "
          f"{report['seconds']} s -> {out}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fibo.envs.demos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=LIFT, help="lift | metaworld/<task> (e.g. metaworld/pick-place-v3)")
    parser.add_argument("--num-demos", type=int, default=100)
    parser.add_argument("--out", required=True, help="output .hdf5 path")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the noise added to executed arm actions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--max-attempts", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        check_demo_options(args.num_demos, args.noise, args.image_size, args.valid_fraction, args.max_attempts)
    except ValueError as err:
        parser.error(str(err).replace("demos: ", "--").replace("_", "-", 1))
    write_demos(args.out, env=args.env, num_demos=args.num_demos, noise=args.noise, seed=args.seed,
                image_size=args.image_size, valid_fraction=args.valid_fraction, max_attempts=args.max_attempts)


if __name__ == "__main__":
    main()
