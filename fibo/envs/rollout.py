"""Rollouts: run a policy for M seeded episodes and measure its success rate.

Episode ``i`` starts from seed ``seed + i``: the same initial placements for every run and policy, so
success rates are paired comparisons. The 95% interval is Wilson's score interval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray: ...


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rollout_seeds(num_episodes: int, seed: int) -> list[int]:
    return [seed + i for i in range(num_episodes)]


def run_rollouts(agent: Agent, env, seeds: Sequence[int], horizon: int, video_episodes: int = 0,
                 video_camera: str | None = None, video_size: int = 84,
                 progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Run ``agent`` once from each seed for at most ``horizon`` steps (an episode ends at success).

    Returns ``success_rate``, ``success_ci_low``/``_high`` (Wilson 95%), ``mean_length`` (steps,
    ``horizon`` for failures), ``successes`` (per episode), ``seconds`` and ``frames`` (a list of
    frame lists for the first ``video_episodes`` episodes, rendered from ``video_camera``).
    """
    successes, lengths, videos = [], [], []
    start = time.time()
    for index, seed in enumerate(seeds):
        agent.reset()
        obs = env.reset(seed=seed)
        record = index < video_episodes and video_camera is not None
        frames = [env.render(video_camera, video_size)] if record else []
        success, length = False, horizon
        for t in range(horizon):
            obs, _, _, _ = env.step(agent.act(obs))
            if record:
                frames.append(env.render(video_camera, video_size))
            if env.is_success():
                success, length = True, t + 1
                break
        successes.append(success)
        lengths.append(length)
        if record:
            videos.append(frames)
        if progress is not None:
            progress(index + 1, len(seeds), sum(successes))
    n, k = len(successes), int(sum(successes))
    low, high = wilson_interval(k, n)
    return {"success_rate": k / n if n else 0.0, "success_ci_low": low, "success_ci_high": high,
            "mean_length": float(np.mean(lengths)) if lengths else 0.0, "episodes": n,
            "successes": successes, "seconds": time.time() - start, "frames": videos}


def write_mp4(path: str | Path, episodes: Sequence[Sequence[np.ndarray]], fps: int = 20) -> Path:
    """Concatenate episodes (lists of HxWx3 uint8 frames) into one H.264 mp4 (PyAV)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [f for ep in episodes for f in ep]
    if not frames:
        raise ValueError("no frames to write")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for frame in frames:
            image = np.ascontiguousarray(frame[: h - h % 2, : w - w % 2])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
