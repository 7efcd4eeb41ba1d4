"""The embedded default video dataset: scikit-learn's real handwritten digits moving across a black
frame, written as H.264 mp4 files. The class is the direction of motion (``down``, ``left``,
``right``, ``up``), never the digit, so a model must use time to tell the classes apart (``left``
and ``right`` clips are each other's time reversal).

Layout written under ``root`` (both layouts the video DataModule reads)::

    root/{train,val,test}/<class>/<id>.mp4     class-named folders (UCF101 / Kinetics style)
    root/{train,val,test}.txt                  list files, one "<relative path> <label>" per line
    root/classes.txt                           label index -> class name
    root/dataset.json                          generation parameters (regenerated when they change)

Command: ``python -m fibo.data.moving_digits [--root data/moving_digits]``; the video DataModule
also writes it on first use.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CLASSES = ("down", "left", "right", "up")
_DIRECTIONS = {"down": (0, 1), "left": (-1, 0), "right": (1, 0), "up": (0, -1)}


@dataclass(frozen=True)
class MovingDigitsSpec:
    """Generation parameters. Sizes in pixels, speed in pixels per frame."""

    frame_size: int = 32
    digit_size: int = 12
    num_frames: int = 16
    fps: int = 16
    speed: int = 1
    per_class: tuple[int, int, int] = (120, 24, 24)  # train, val, test videos per class
    seed: int = 0
    crf: int = 10  # H.264 quality (lower = better)


def _render_clip(digit: np.ndarray, direction: tuple[int, int], spec: MovingDigitsSpec, rng: np.random.Generator) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 frames of ``digit`` (a ``(s, s)`` uint8 image) moving along ``direction``."""
    size, s, travel = spec.frame_size, spec.digit_size, spec.speed * (spec.num_frames - 1)
    if s + travel > size:
        raise ValueError(f"digit_size {s} + travel {travel} px does not fit a {size}px frame")
    dx, dy = direction
    # start so that the whole trajectory stays inside the frame; free axis anywhere
    x0 = rng.integers(0, size - s - travel + 1) + (travel if dx < 0 else 0) if dx else rng.integers(0, size - s + 1)
    y0 = rng.integers(0, size - s - travel + 1) + (travel if dy < 0 else 0) if dy else rng.integers(0, size - s + 1)
    brightness = rng.uniform(0.7, 1.0)
    frames = np.zeros((spec.num_frames, size, size, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        x, y = x0 + dx * spec.speed * t, y0 + dy * spec.speed * t
        frames[t, y:y + s, x:x + s, :] = (digit * brightness).astype(np.uint8)[..., None]
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 10) -> None:
    """Write ``(T, H, W, 3)`` uint8 RGB frames as H.264 (yuv420p) mp4 with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _generated_paths(root: Path) -> list[Path]:
    """The files and folders :func:`generate` writes under ``root`` (split/class folders, lists, stamp)."""
    splits = ("train", "val", "test")
    return ([root / split / name for split in splits for name in CLASSES]
            + [root / f"{split}.txt" for split in splits] + [root / "classes.txt", root / "dataset.json"])


def generate(root: str | Path, spec: MovingDigitsSpec = MovingDigitsSpec(), force: bool = False) -> Path:
    """Write the dataset under ``root`` unless a complete one with the same ``spec`` is there.

    A dataset with another spec (or a partial one) is replaced: only the paths a generation writes
    (``<split>/<class>/``, ``<split>.txt``, ``classes.txt``, ``dataset.json``) are removed first;
    anything else under ``root`` stays.

    Returns ``root``. Takes ~10-20 s for the default 672 videos on 2 CPU cores.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    stamp = root / "dataset.json"
    wanted = {"name": "moving_digits", "classes": list(CLASSES), **asdict(spec)}
    wanted["per_class"] = list(spec.per_class)
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    for path in _generated_paths(root):  # only what a generation writes: never the user's own files there
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    digits = load_digits()
    rng = np.random.default_rng(spec.seed)
    # digits for each split come from disjoint halves of the digit set (appearance never leaks)
    order = rng.permutation(len(digits.images))
    pools = np.array_split(order, 3)
    for split, count, pool in zip(("train", "val", "test"), spec.per_class, pools):
        lines = []
        for label, name in enumerate(CLASSES):
            for i in range(count):
                idx = pool[rng.integers(len(pool))]
                img = Image.fromarray((digits.images[idx] * (255 / 16)).astype(np.uint8))
                digit = np.asarray(img.resize((spec.digit_size, spec.digit_size), Image.BICUBIC))
                frames = _render_clip(digit, _DIRECTIONS[name], spec, rng)
                rel = Path(split) / name / f"{name}_{i:04d}.mp4"
                write_mp4(root / rel, frames, spec.fps, spec.crf)
                lines.append(f"{rel.as_posix()} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    stamp.write_text(json.dumps(wanted, indent=2))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/moving_digits", help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rewrite even if a matching dataset exists")
    args = parser.parse_args(argv)
    root = generate(args.root, force=args.force)
    n = sum(1 for _ in root.rglob("*.mp4"))
    print(f"moving_digits: {n} mp4 videos, {len(CLASSES)} classes {list(CLASSES)} in {root}")


if __name__ == "__main__":
    main()
