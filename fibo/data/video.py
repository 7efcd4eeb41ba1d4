"""Video clip DataModule (pytorchvideo decoding with PyAV, pytorchvideo transforms).

Batches are ``(clips, labels, video_index)``: ``clips`` float ``(B, C, T, H, W)`` normalised per
channel, ``labels`` int64 ``(B,)``, ``video_index`` int64 ``(B,)`` (which video of the split a clip
comes from, used to combine the test views of one video). A view whose video fails to decode is
left out of its batch and counted (:class:`ClipLoader`), never replaced by another video's clip.

Sampling follows SlowFast/TimeSformer: a clip is ``num_frames`` frames taken every
``sampling_rate`` frames, chosen as frame numbers (:meth:`VideoClipDataset.frame_indices`) and
decoded by exact timestamps (:func:`fibo.data.video_io.decode_frames`), so that no frame rate
(29.97 fps = 30000/1001) drops or repeats a frame. Training: one random clip per video, random resized crop, optional
horizontal flip. Testing: ``test_clips`` clips uniformly spaced in time x ``test_crops`` spatial
crops (left/centre/right or top/centre/bottom) of the short-side-resized frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fibo.data.report import DataReport
from fibo.data.transforms import check_img_size
from fibo.data.subset import resolve_train_samples, stratified_subset
from fibo.data._pytorchvideo import ensure_pytorchvideo_importable
from fibo.data.video_io import (
    BadVideoError,
    VideoInfo,
    decode_all_frames,
    decode_frames,
    parse_list_file,
    probe_video,
    scan_class_folders,
)

log = logging.getLogger(__name__)
ON_BAD_VIDEO = ("skip", "error")


class Unreadable(NamedTuple):
    """What :class:`VideoClipDataset` returns for a view that failed to decode (``on_bad_video=skip``):
    :class:`ClipLoader` leaves it out of the batch and records it in the main process."""

    path: str
    reason: str


def collate_clips(items: list) -> tuple[list | None, list[Unreadable]]:
    """``default_collate`` of the decoded views (``None`` if none decoded) and the :class:`Unreadable` ones."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    return (default_collate(good) if good else None), [item for item in items if isinstance(item, Unreadable)]


class ClipLoader(DataLoader):
    """A DataLoader of :class:`VideoClipDataset` whose batches leave out the views that failed to decode,
    so that an unreadable video is never scored (nor trained on) under another video's index. The
    failures are recorded in ``failures`` (path -> reason) by the main process, as they arrive with
    the batches: decode failures inside worker processes (``num_workers > 0``) are counted too.

    Batches are ``(clips, labels, video_index)`` as from a plain DataLoader; a batch whose views all
    failed is skipped (so an epoch may have fewer batches than ``len(loader)``).
    """

    def __init__(self, *args: Any, failures: dict[str, str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", collate_clips)
        super().__init__(*args, **kwargs)
        self.failures = {} if failures is None else failures

    def __iter__(self):
        for batch, failed in super().__iter__():
            for item in failed:
                self.failures.setdefault(item.path, item.reason)
            if batch is not None:
                yield batch


class VideoClipDataset(Dataset):
    """Map-style dataset of clips. Item ``i`` = video ``i // views``, view ``i % views``.

    Args:
        samples: ``(path, label, VideoInfo)`` triples (already probed).
        num_frames, sampling_rate: clip length in frames and the stride between them.
        crop_size: output side in pixels.
        train: random clip/crop/flip (one view per video) or deterministic test views.
        views: ``(clips, crops)`` per video when not training.
        mean, std: per-channel normalisation of [0, 1] pixel values.
        hflip: probability of a horizontal flip in training (0 for direction-defined classes).
        scale: area range of the training random resized crop.
        on_bad_video: ``skip`` (log and return :class:`Unreadable`, which :class:`ClipLoader` leaves out
            and counts) or ``error`` (raise) when a video fails to decode here despite the probe.
        pad_short_videos: a video shorter than a clip repeats its last frame (frame indices clamped,
            as SlowFast/TimeSformer's ``temporal_sampling``) instead of being resampled.
        frames: optional decoded videos (uint8 ``(C, T, H, W)`` per sample) to slice clips from
            instead of decoding files each time.
    """

    def __init__(self, samples, num_frames: int, sampling_rate: int, crop_size: int, train: bool,
                 views: tuple[int, int] = (1, 1), mean: Sequence[float] = (0.45,) * 3,
                 std: Sequence[float] = (0.225,) * 3, hflip: float = 0.5, scale: Sequence[float] = (0.08, 1.0),
                 on_bad_video: str = "skip", frames: list[torch.Tensor] | None = None,
                 pad_short_videos: bool = False) -> None:
        ensure_pytorchvideo_importable()
        self.samples = list(samples)
        self.frames = frames
        self.num_frames, self.sampling_rate, self.crop_size, self.train = num_frames, sampling_rate, crop_size, train
        self.clips, self.crops = (1, 1) if train else views
        self.mean = torch.tensor(mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1, 1)
        self.hflip, self.scale, self.on_bad_video = hflip, tuple(scale), on_bad_video
        self.pad_short_videos = pad_short_videos

    def __len__(self) -> int:
        return len(self.samples) * self.clips * self.crops

    def frame_indices(self, info: VideoInfo, clip_idx: int) -> torch.Tensor:
        """The frame numbers (int64 ``(T,)``, 0-based) of a clip: ``first + k x sampling_rate`` for
        ``k < T``, clamped to the last frame (``pad_short_videos``). ``first`` is a random frame of
        the slack (training) or ``test_clips`` frames evenly spaced over it (testing; the centre for
        one clip). Whole frames, never seconds: no frame rate (29.97 fps) can drop or repeat one."""
        slack = max(0, info.num_frames - ((self.num_frames - 1) * self.sampling_rate + 1))
        if self.train:
            first = int(torch.randint(slack + 1, ()).item())
        else:
            first = slack // 2 if self.clips == 1 else round(slack * clip_idx / (self.clips - 1))
        return (first + torch.arange(self.num_frames) * self.sampling_rate).clamp_(max=info.num_frames - 1)

    def _load(self, video_idx: int, clip_idx: int, crop_idx: int) -> torch.Tensor:
        from pytorchvideo.transforms import functional as PVF

        path, _, info = self.samples[video_idx]
        index = self.frame_indices(info, clip_idx)
        if self.frames is not None:  # the decoded video (cache_frames)
            frames, first = self.frames[video_idx], 0
        else:
            first = int(index[0])
            frames = decode_frames(path, first, int(index[-1]), info.rate)  # (C, T', H, W) uint8
        available = first + frames.shape[1]  # frames decoded up to here
        if int(index[-1]) >= available:
            if not self.pad_short_videos:
                raise BadVideoError(path, f"decodes to {available} frames, not the {info.num_frames} its header "
                                          f"says; a clip needs frame {int(index[-1])} (truncated?)")
            index = index.clamp(max=available - 1)
        clip = frames[:, index - first].float() / 255.0
        if self.train:
            clip = PVF.random_resized_crop(clip, self.crop_size, self.crop_size, scale=self.scale,
                                           aspect_ratio=(3 / 4, 4 / 3))
            if self.hflip > 0 and torch.rand(()) < self.hflip:
                clip = clip.flip(-1)
        else:
            clip = PVF.short_side_scale(clip, self.crop_size)
            spatial_idx = 1 if self.crops == 1 else min(crop_idx, 2)
            clip = PVF.uniform_crop(clip, self.crop_size, spatial_idx)
        return (clip - self.mean) / self.std

    def __getitem__(self, i: int):
        """``(clip, label, video_index)``, or :class:`Unreadable` when the view fails to decode and
        ``on_bad_video`` is ``skip`` (never another video's clip: scores stay per video)."""
        video_idx, view = divmod(i, self.clips * self.crops)
        clip_idx, crop_idx = divmod(view, self.crops)
        try:
            return self._load(video_idx, clip_idx, crop_idx), self.samples[video_idx][1], video_idx
        except Exception as err:  # noqa: BLE001 - decoding errors come in many types
            path = self.samples[video_idx][0]
            if self.on_bad_video == "error":
                raise BadVideoError(path, f"failed to decode a clip ({err}); fix or remove the file, or set data.on_bad_video=skip") from err
            log.warning("skipping %s: failed to decode a clip (%s)", path, err)
            return Unreadable(str(path), f"failed to decode a clip ({type(err).__name__}: {err})")


class VideoDataModule(L.LightningDataModule):
    """Action recognition clips from class-named folders or ``path label`` list files.

    Sources, first match wins:

    * ``train_list`` (and ``val_list``, ``test_list``): list files (paths relative to ``root`` if
      set, else to the list file);
    * ``root`` with ``train/``, ``val/`` and optionally ``test/`` class folders (``test`` defaults to
      ``val`` when missing);
    * ``generate=moving_digits``: the embedded dataset, written to ``root`` on first use.

    Args:
        num_frames (T), sampling_rate: clip = T frames every ``sampling_rate`` frames.
        img_size: crop side in pixels (what the model sees; positive, square; its divisibility by
            ``model.patch_size`` is the model's check).
        test_clips, test_crops: test views per video (their softmax outputs summed per video).
        cache_frames: decode every video once at setup and keep its frames in memory (for small
            datasets such as the embedded one; a full decode also catches damage anywhere in a file).
        on_bad_video: ``skip``: unusable videos (missing, empty, corrupt, truncated, audio-only,
            shorter than a clip) are left out with a warning naming each, counted in
            ``skipped_videos`` (logged to MLflow); ``error``: the first one raises.
        pad_short_videos: keep videos shorter than a clip (``(T - 1) * sampling_rate + 1`` frames) and
            repeat their last frame (SlowFast/TimeSformer behaviour; counted as ``padded_videos``)
            instead of treating them as unusable. Off by default: a too-short video usually means a
            wrong ``num_frames``/``sampling_rate``; on in the paper's video overlays (8 x 32 frames).
        train_samples: train on a subset of the listed training videos: ``None`` (all), a number of
            videos or a fraction in (0, 1]; stratified per class, nested, seeded by ``split_seed``
            (:func:`fibo.data.subset.stratified_subset`), drawn before probing (an unusable video of
            the subset is left out, so ``data/train_samples`` reports the number actually used).
        split_seed: seed of that subset.

    Raises:
        FileNotFoundError / ValueError: missing folders or list files, malformed lines, bad sizes,
        every video of a split unusable, ``data.num_classes`` not matching the data.
    """

    modality = "video"  # the task family this data serves (fibo.config_check.check_task_data)

    def __init__(self, root: str | None = None, train_list: str | None = None, val_list: str | None = None,
                 test_list: str | None = None, generate: str | None = None, num_classes: int = 4,
                 in_chans: int = 3, img_size: int = 32, num_frames: int = 8,
                 sampling_rate: int = 2, test_clips: int = 2, test_crops: int = 1, batch_size: int = 16,
                 num_workers: int = 0, mean: Sequence[float] = (0.45, 0.45, 0.45),
                 std: Sequence[float] = (0.225, 0.225, 0.225), hflip: float = 0.5,
                 scale: Sequence[float] = (0.08, 1.0), on_bad_video: str = "skip", cache_frames: bool = False,
                 pad_short_videos: bool = False, train_samples: int | float | None = None,
                 split_seed: int = 0) -> None:
        super().__init__()
        img_size = check_img_size(img_size, square_only="video clips are square crops (pytorchvideo's uniform_crop)")
        if on_bad_video not in ON_BAD_VIDEO:
            raise ValueError(f"data.on_bad_video={on_bad_video!r}: choose one of {list(ON_BAD_VIDEO)}")
        if generate not in (None, "moving_digits"):
            raise ValueError(f"data.generate={generate!r}: the only embedded dataset is 'moving_digits'")
        if not (root or train_list):
            raise ValueError("video data needs data.root=<folder with train/ and val/ class folders> "
                             "or data.train_list=<file of '<path> <label>' lines>")
        self.root = Path(root).expanduser() if root else None
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.generate, self.num_classes, self.in_chans = generate, num_classes, in_chans
        self.img_size = img_size
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.views = (test_clips, test_crops)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.mean, self.std, self.hflip, self.scale = tuple(mean), tuple(std), hflip, tuple(scale)
        self.on_bad_video, self.cache_frames, self.pad_short_videos = on_bad_video, cache_frames, pad_short_videos
        self.train_samples, self.split_seed = train_samples, split_seed
        self.padded_videos: list[str] = []
        self.skipped_videos: list[tuple[str, str]] = []
        self.decode_failures: dict[str, str] = {}  # path -> reason, filled by the loaders (ClipLoader)
        self.datasets: dict[str, VideoClipDataset] = {}

    def prepare_data(self) -> None:
        if self.generate == "moving_digits":
            from fibo.data.moving_digits import generate

            generate(self.root)

    def _split_samples(self) -> dict[str, list[tuple[Path, int]]]:
        if self.lists["train"]:
            out = {}
            for split in ("train", "val", "test"):
                src = self.lists[split] or (self.lists["val"] if split == "test" else None)
                if split == "test" and not self.lists["test"] and src:
                    log.info("data.test_list is not set: testing on the validation list %s", src)
                if src is None:
                    raise ValueError(f"data.{split}_list is not set (train_list is): give a list file for it")
                out[split] = parse_list_file(src, self.root)
            return out
        train, classes = scan_class_folders(self.root / "train")
        val, _ = scan_class_folders(self.root / "val", classes)
        if (self.root / "test").is_dir():
            test = scan_class_folders(self.root / "test", classes)[0]
        else:
            log.info("no %s folder: testing on the validation videos", self.root / "test")
            test = val
        if len(classes) != self.num_classes:
            raise ValueError(f"data.num_classes={self.num_classes} but {self.root / 'train'} has "
                             f"{len(classes)} class folders: set data.num_classes={len(classes)}")
        self.classes = classes
        return {"train": train, "val": val, "test": test}

    def _train_subset(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """``samples`` or their ``data.train_samples`` subset (stratified, nested, seeded)."""
        if self.train_samples is None:
            return samples
        labels = [label for _, label in samples]
        n = resolve_train_samples(self.train_samples, len(labels), len(set(labels)))
        return [samples[i] for i in stratified_subset(labels, n, self.split_seed)]

    def _probe(self, split: str, samples) -> tuple[list, list | None]:
        clip_frames = (self.num_frames - 1) * self.sampling_rate + 1
        min_frames = 1 if self.pad_short_videos else clip_frames
        good, frames = [], [] if self.cache_frames else None
        for path, label in samples:
            if label >= self.num_classes:
                raise ValueError(f"{path}: label {label} >= data.num_classes={self.num_classes}")
            try:
                info = probe_video(path, min_frames)
                if frames is not None:
                    decoded = decode_all_frames(path)
                    if decoded.shape[1] < min_frames:
                        raise BadVideoError(path, f"decodes to {decoded.shape[1]} frames but a clip needs {min_frames} (truncated?)")
                    info = VideoInfo.of(info.rate, decoded.shape[1])
                    frames.append(decoded)
                if info.num_frames < clip_frames:
                    self.padded_videos.append(str(path))
                good.append((path, label, info))
            except BadVideoError as err:
                if self.on_bad_video == "error":
                    raise BadVideoError(err.path, err.reason + " (data.on_bad_video=error; set it to skip to leave such files out)") from None
                log.warning("skipping %s video %s", split, err)
                self.skipped_videos.append((err.path, err.reason))
        if not good:
            listed = {str(path) for path, _ in samples}
            reasons = [reason for path, reason in self.skipped_videos if str(path) in listed]
            example = f"; e.g. {reasons[-1]}" if reasons else ""
            raise ValueError(f"no usable video in the {split} split ({len(samples)} listed, all skipped{example})")
        return good, frames

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.prepare_data()
        common = dict(num_frames=self.num_frames, sampling_rate=self.sampling_rate, crop_size=self.img_size,
                      mean=self.mean, std=self.std, on_bad_video=self.on_bad_video,
                      pad_short_videos=self.pad_short_videos)
        for split, samples in self._split_samples().items():
            if split == "train":
                samples = self._train_subset(samples)
            probed, frames = self._probe(split, samples)
            self.datasets[split] = VideoClipDataset(probed, train=split == "train", views=self.views, hflip=self.hflip,
                                                    scale=self.scale, frames=frames, **common)
        if self.skipped_videos:
            log.warning("left out %d unusable video(s) (data.on_bad_video=skip)", len(self.skipped_videos))
        if self.padded_videos:
            log.info("%d video(s) shorter than a clip of %d frames repeat their last frame (data.pad_short_videos=true)",
                     len(self.padded_videos), (self.num_frames - 1) * self.sampling_rate + 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return ClipLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          failures=self.decode_failures)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def report(self) -> DataReport:
        """Counts (videos per split; distinct videos left out as unusable at setup or when a clip
        failed to decode in a loader; distinct padded videos: a file in several splits counts once) and the list of left-out videos as
        ``data/skipped_videos.tsv`` (path, reason)."""
        metrics: dict[str, float] = {f"data/{k}_videos": len(v.samples) for k, v in self.datasets.items()}
        if "train" in self.datasets:
            metrics["data/train_samples"] = len(self.datasets["train"].samples)
        skipped: dict[str, str] = {}  # per video, not per split: a file listed for val and test counts once
        for path, reason in [*self.skipped_videos, *self.decode_failures.items()]:
            skipped.setdefault(str(path), reason)
        metrics["data/skipped_videos"] = len(skipped)
        metrics["data/padded_videos"] = len(set(self.padded_videos))
        texts = {"data/skipped_videos.tsv": "".join(f"{p}\t{r}\n" for p, r in skipped.items())} if skipped else {}
        return DataReport(metrics=metrics, texts=texts)
