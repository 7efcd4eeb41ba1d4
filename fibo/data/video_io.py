"""Finding, listing and checking videos. Decoding goes through pytorchvideo (PyAV backend).

Errors name the file and the fix. The DataModule applies the ``on_bad_video`` policy to them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")

log = logging.getLogger(__name__)


class BadVideoError(Exception):
    """A video that cannot be used: ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What the probe read: frames per second (``fps`` as a float, ``rate`` exact: ``30000/1001``
    for 29.97 fps), frame count and duration in seconds."""

    fps: float
    num_frames: int
    duration: float
    rate: Fraction

    @classmethod
    def of(cls, rate: Fraction, num_frames: int) -> "VideoInfo":
        """The info of ``num_frames`` frames at ``rate`` frames per second."""
        return cls(fps=float(rate), num_frames=num_frames, duration=float(num_frames / rate), rate=rate)


def probe_video(path: str | Path, min_frames: int = 1) -> VideoInfo:
    """Open ``path`` with PyAV, check that it has a video stream with at least ``min_frames``
    frames and that its first frame decodes, and return its :class:`VideoInfo`. Cheap (header and
    one frame); damage further into a file shows when its clips are decoded.

    Raises:
        BadVideoError: missing, empty, unreadable/corrupt, audio-only, or shorter than ``min_frames``.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise BadVideoError(path, "file not found (check the path in the list file or data.root)")
    if path.stat().st_size == 0:
        raise BadVideoError(path, "empty file (0 bytes); re-export or remove it")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise BadVideoError(path, f"no video stream (streams: {', '.join(kinds)}); an audio-only file cannot be a clip")
            stream = container.streams.video[0]
            rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
            count = frame_count(stream, container.duration, rate)
            first = next(iter(container.decode(stream)), None)
    except BadVideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:  # corrupt or truncated data
        raise BadVideoError(path, f"cannot be decoded ({type(err).__name__}: {err}); the file is corrupt or truncated") from err
    if first is None or not count:
        raise BadVideoError(path, "no decodable frames (empty or truncated video)")
    if rate <= 0:
        raise BadVideoError(path, "no frame rate in the container")
    if count < min_frames:
        raise BadVideoError(
            path, f"has {count} frames but a clip needs {min_frames} ((data.num_frames - 1) x data.sampling_rate + 1); "
            f"lower those, set data.pad_short_videos=true to repeat its last frame, or remove the video"
        )
    return VideoInfo.of(rate, count)


def frame_count(stream, container_duration: int | None, rate: Fraction) -> int:
    """Frames of a PyAV video ``stream``: the header's count (mp4, avi), else its duration (in
    ``stream.time_base`` units) or the container's (microseconds; mkv and webm have only this)
    times ``rate``, in exact fractions, rounded to the nearest frame. 0 when none is known."""
    if stream.frames:
        return int(stream.frames)
    if not rate:
        return 0
    if stream.duration and stream.time_base:
        return round(stream.duration * stream.time_base * rate)
    if container_duration:
        return round(Fraction(container_duration, 1_000_000) * rate)  # av.time_base: 1/1_000_000 s
    return 0


def decode_frames(path: str | Path, first: int, last: int, rate: Fraction) -> torch.Tensor:
    """Frames ``first..last`` (0-based, inclusive) of ``path`` as uint8 ``(C, T, H, W)``, ``T <=
    last - first + 1`` (fewer only past the end of the video), decoded by pytorchvideo's PyAV backend.

    Frame ``i`` is shown at ``i / rate`` seconds; the clip is asked for the half-open time range
    ``[(first - 1/2) / rate, (last + 1/2) / rate)`` in exact fractions (as pytorchvideo's
    ``get_clip`` advises), so that a frame rate such as 29.97 fps (``30000/1001``) and timestamps
    rounded to the container's time base (milliseconds in mkv/webm) neither drop nor repeat a frame.

    Raises:
        BadVideoError: nothing in that range decodes (corrupt or truncated file).
    """
    from fibo.data._pytorchvideo import ensure_pytorchvideo_importable

    ensure_pytorchvideo_importable()
    from pytorchvideo.data.encoded_video import EncodedVideo

    start, end = max(Fraction(0), (first - Fraction(1, 2)) / rate), (last + Fraction(1, 2)) / rate
    video = EncodedVideo.from_path(str(path), decode_audio=False, decoder="pyav")
    try:
        frames = video.get_clip(start, end)["video"]  # (C, T, H, W) float 0..255
    finally:
        video.close()
    if frames is None or frames.shape[1] == 0:
        raise BadVideoError(path, f"no frames decoded from frame {first} to {last} ({float(start):.3f}s to "
                                  f"{float(end):.3f}s); the file is corrupt or truncated")
    return frames[:, : last - first + 1].clamp_(0, 255).to(torch.uint8)


def decode_all_frames(path: str | Path) -> torch.Tensor:
    """Every frame of ``path`` as uint8 ``(C, T, H, W)``, decoded by pytorchvideo's PyAV backend.

    Raises:
        BadVideoError: the file cannot be decoded to the end.
    """
    from fibo.data._pytorchvideo import ensure_pytorchvideo_importable

    ensure_pytorchvideo_importable()
    from pytorchvideo.data.encoded_video import EncodedVideo

    try:
        video = EncodedVideo.from_path(str(path), decode_audio=False, decoder="pyav")
        try:  # to the end: without a duration in the header, pytorchvideo's is the last frame's start
            frames = video.get_clip(0, math.inf)["video"]
        finally:
            video.close()
    except Exception as err:  # noqa: BLE001 - PyAV raises many error types
        raise BadVideoError(path, f"cannot be decoded ({type(err).__name__}: {err}); the file is corrupt or truncated") from err
    if frames is None or frames.shape[1] == 0:
        raise BadVideoError(path, "no decodable frames (empty or truncated video)")
    return frames.clamp_(0, 255).to(torch.uint8)


def parse_list_file(list_file: str | Path, root: str | Path | None = None) -> list[tuple[Path, int]]:
    """Read ``<path> <label>`` lines (the layout of NTU / Smarthome / N-UCLA lists).

    The label is the last whitespace-separated token, so paths may contain spaces. Relative paths
    are resolved against ``root`` if given, else against the list file's folder. Blank lines and
    lines starting with ``#`` are ignored. Listed files that do not exist are named in one warning,
    each with its line number (they are then skipped or refused as ``data.on_bad_video`` says).

    Raises:
        FileNotFoundError: the list file is missing.
        ValueError: malformed lines, naming the file, every bad line's number and text, and the
            expected format.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"video list {list_file} not found (expected lines '<path> <integer label>')")
    base = Path(root) if root else list_file.parent
    samples, bad, missing = [], [], []
    for line_no, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            bad.append(f"{line_no}: {raw!r}")
            continue
        path = Path(parts[0])
        samples.append((path if path.is_absolute() else base / path, int(parts[1])))
        if not samples[-1][0].is_file():
            missing.append(f"{line_no}: {str(samples[-1][0])!r}")
    if bad:  # every malformed line at once, each with its number (the first 10 named)
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(
            f"{list_file}: {len(bad)} malformed line(s) (line {'; line '.join(bad[:10])}{more}): expected "
            f"'<path> <integer label>' with a label >= 0"
        )
    if not samples:
        raise ValueError(f"video list {list_file} has no entries")
    if missing:  # every missing file at once, each with its line number (the first 10 named)
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        log.warning("%s: %d listed file(s) not found (line %s%s); paths are relative to %s", list_file, len(missing),
                    "; line ".join(missing[:10]), more, base)
    return samples


def scan_class_folders(folder: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """``folder/<class>/**/<video>`` -> samples and sorted class names (UCF101 / HMDB51 / Kinetics
    layout). With ``classes`` given (from the training split), labels follow that order.

    Raises:
        FileNotFoundError: ``folder`` missing or holding no class folders with videos.
        ValueError: a class folder that the training split does not have.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} not found: expected {folder}/<class_name>/<video files>")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders {unknown} that the training split does not have")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (p, index[c]) for c in found for p in sorted((folder / c).rglob("*"))
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
    ]
    if not samples:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {folder}/<class_name>/")
    return samples, classes
