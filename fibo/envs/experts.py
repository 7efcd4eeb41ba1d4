"""Scripted experts that produce demonstrations.

* :class:`LiftExpert`: robosuite Lift with the Panda's OSC_POSE controller (7-d actions: position and
  rotation deltas in [-1, 1], gripper -1 open / +1 closed). Four phases: above the cube, descend,
  close the gripper, lift. Succeeds in ~30-40 steps.
* :class:`MetaworldExpert`: metaworld's shipped policy for the task (``metaworld.policies``).
"""

from __future__ import annotations

import numpy as np


class LiftExpert:
    """Proportional OSC_POSE position control through four phases; rotation deltas stay 0."""

    def __init__(self, gain: float = 10.0, hover: float = 0.06, grasp_depth: float = -0.005,
                 close_steps: int = 10, lift_height: float = 0.15) -> None:
        self.gain, self.hover, self.grasp_depth = gain, hover, grasp_depth
        self.close_steps, self.lift_height = close_steps, lift_height
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self._closing = 0
        self._cube0 = None

    def act(self, obs: dict, env) -> np.ndarray:
        cube = env.object_position()
        if self._cube0 is None:
            self._cube0 = cube.copy()
        eef = np.asarray(obs["robot0_eef_pos"])
        gripper = -1.0
        if self.phase == 0:  # above the cube
            target = cube + np.array([0.0, 0.0, self.hover])
            if np.linalg.norm((target - eef)[:2]) < 0.008 and abs(target[2] - eef[2]) < 0.02:
                self.phase = 1
        if self.phase == 1:  # descend around it
            target = cube + np.array([0.0, 0.0, self.grasp_depth])
            if abs(target[2] - eef[2]) < 0.01 and np.linalg.norm((target - eef)[:2]) < 0.01:
                self.phase = 2
        if self.phase == 2:  # close the gripper in place
            target, gripper = cube + np.array([0.0, 0.0, self.grasp_depth]), 1.0
            self._closing += 1
            if self._closing >= self.close_steps:
                self.phase = 3
        if self.phase == 3:  # lift
            target, gripper = self._cube0 + np.array([0.0, 0.0, self.lift_height]), 1.0
            target[:2] = eef[:2]
        action = np.zeros(env.action_dim)
        action[:3] = np.clip(self.gain * (target - eef), -1.0, 1.0)
        action[-1] = gripper
        return action


class MetaworldExpert:
    """metaworld's scripted policy for one task (e.g. ``pick-place-v3`` -> ``SawyerPickPlaceV3Policy``)."""

    def __init__(self, task: str) -> None:
        import metaworld.policies as policies

        name = "Sawyer" + "".join(part.capitalize() for part in task.split("-")) + "Policy"
        if not hasattr(policies, name):
            known = sorted(n for n in dir(policies) if n.endswith("Policy"))
            raise ValueError(f"metaworld ships no policy {name} for task {task!r}; known: {known[:10]}...")
        self.policy = getattr(policies, name)()

    def reset(self) -> None:
        pass

    def act(self, obs: dict, env) -> np.ndarray:
        return np.clip(self.policy.get_action(env.raw_observation), -1.0, 1.0)
