"""Headless camera images from a MuJoCo model: ``mujoco.Renderer`` with shadows, reflections, skybox
and multisampling off (about 30-40 ms per 84x84 frame on a CPU), upright (row 0 = top)."""

from __future__ import annotations

import os

import numpy as np

import fibo.envs  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)

RENDER_HELP = (
    "headless rendering needs MUJOCO_GL=egl (Debian/Ubuntu packages: apt-get install -y libegl1 "
    "libegl-mesa0 libgl1-mesa-dri) or MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa (apt-get install -y "
    "libosmesa6)"
)


def _load_llvm_users_first() -> None:
    """Import triton (torch's compiler backend, which bundles its own LLVM) before Mesa's llvmpipe
    loads LLVM for the GL context: the other order segfaults when triton is first imported later
    (e.g. by ``torch._dynamo`` through torchvision or Lightning)."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken triton only matters to code that uses it
            pass


class RenderingUnavailable(RuntimeError):
    """No OpenGL context could be created for offscreen rendering."""


class CameraRenderer:
    """Renders named cameras of one ``mujoco.MjModel`` at ``height`` x ``width``.

    Raises:
        RenderingUnavailable: naming ``MUJOCO_GL`` and the system packages to install.
    """

    def __init__(self, model, height: int = 84, width: int = 84) -> None:
        _load_llvm_users_first()
        import mujoco

        self.model = model
        model.vis.quality.offsamples = 0  # no MSAA
        try:
            self._renderer = mujoco.Renderer(model, height=height, width=width)
        except Exception as err:  # noqa: BLE001 - mujoco raises several types when GL is missing
            raise RenderingUnavailable(
                f"cannot render camera images (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: "
                f"{type(err).__name__}: {err}); {RENDER_HELP}"
            ) from err
        flags = self._renderer.scene.flags
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
            flags[flag] = 0
        self._camera_ids: dict[str, int] = {}

    def camera_id(self, name: str) -> int:
        import mujoco

        if name not in self._camera_ids:
            cid = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
            if cid < 0:
                names = [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.model.ncam)]
                raise ValueError(f"camera {name!r} is not in the model; its cameras are {names}")
            self._camera_ids[name] = cid
        return self._camera_ids[name]

    def render(self, data, camera: str) -> np.ndarray:
        """``(H, W, 3)`` uint8, upright."""
        self._renderer.update_scene(data, camera=self.camera_id(camera))
        return self._renderer.render().copy()

    def close(self) -> None:
        self._renderer.close()
