"""Simulation for the robot task: environments recreated from a dataset's ``env_args``, headless
rendering, scripted experts, demonstration files and rollouts.

``MUJOCO_GL`` must be set before MuJoCo is first imported; fibo picks ``egl`` unless the user chose
(``osmesa`` works too, see :mod:`fibo.envs.render`).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "osmesa":
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
