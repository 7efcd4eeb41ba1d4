"""LightningDataModules for image classification: digits (bundled), CIFAR-10/100, image folders.

Every module yields ``(images, labels)`` batches: ``images`` float ``(B, C, H, W)`` (``img_size``
square, or ``(H, W)``) normalised per channel, ``labels`` int64 ``(B,)``. Splits are fixed by
``split_seed`` (independent of the training seed), so every run of a sweep sees the same
train/val/test images; ``train_samples`` trains on a nested, stratified subset of the train split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from fibo.data.report import DataReport
from fibo.data.subset import resolve_train_samples, stratified_subset
from fibo.data.transforms import build_transform, check_img_size


class TransformedDataset(Dataset):
    """Applies ``transform`` to the images of ``(image, label)`` samples of ``base``."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class PILListDataset(Dataset):
    """In-memory list of PIL images with integer labels."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int]) -> None:
        self.images, self.labels = list(images), [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer label of every sample of ``dataset``, read from ``targets``/``labels`` (torchvision,
    :class:`PILListDataset`) through any :class:`~torch.utils.data.Subset` nesting without loading
    images; other datasets are iterated."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.asarray([label for _, label in dataset], dtype=np.int64)


def split_indices(labels: Sequence[int], sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Stratified split of ``range(len(labels))`` into parts of exactly ``sizes`` (summing to
    ``len(labels)``), reproducible from ``seed`` alone (scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if sum(sizes) != len(labels):
        raise ValueError(f"split sizes {list(sizes)} do not add up to {len(labels)} samples")
    rest = np.arange(len(labels))
    parts = []
    for size in sizes[:-1]:
        counts = np.unique(labels[rest], return_counts=True)[1]
        # stratify when every part can hold every class (scikit-learn's requirement), else plain split
        stratify = labels[rest] if min(size, len(rest) - size) >= len(counts) and counts.min() >= 2 else None
        take, rest = train_test_split(rest, train_size=int(size), random_state=seed, stratify=stratify)
        parts.append(np.sort(take))
    parts.append(np.sort(rest))
    return parts


class ImageDataModule(L.LightningDataModule):
    """Shared loader logic. Subclasses implement :meth:`_make_splits` returning untransformed
    ``(train, val, test)`` datasets of ``(PIL image, label)``.

    Args:
        data_dir: where datasets live (``paths.data_dir``).
        img_size: side in pixels fed to the model (images are resized to it), or ``[height, width]``
            (timm's ``(H, W)``).
        num_classes, in_chans: what the model is built for; checked against the data.
        batch_size, num_workers: loader settings (``num_workers=0`` loads in the main process).
        mean, std: per-channel normalisation.
        augment: training augmentation (keyword arguments of ``timm.data.create_transform``).
        split_seed: seed of the fixed train/val(/test) split and of the training subset.
        train_samples: train on a subset of the training split: ``None`` (all), a number of images or
            a fraction in (0, 1]; stratified per class and nested (:func:`fibo.data.subset.stratified_subset`);
            val/test unchanged.

    Raises:
        ValueError: image size not positive (:func:`fibo.data.transforms.check_img_size`; its
            divisibility by the patch size is the model's check, ``model.patch_size``);
            ``train_samples`` out of range (at setup).
    """

    modality = "image"  # the task family this data serves (fibo.config_check.check_task_data)

    name = "images"

    def __init__(
        self,
        data_dir: str = "data",
        img_size: int | Sequence[int] = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: Mapping[str, Any] | None = None,
        split_seed: int = 0,
        train_samples: int | float | None = None,
    ) -> None:
        super().__init__()
        img_size = check_img_size(img_size)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"data.mean/std need {in_chans} values (in_chans), got {list(mean)} / {list(std)}")
        self.data_dir = Path(data_dir)
        self.img_size = img_size
        self.num_classes, self.in_chans = num_classes, in_chans
        self.batch_size, self.num_workers = batch_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = dict(augment or {})
        self.split_seed, self.train_samples = split_seed, train_samples
        self.train_set = self.val_set = self.test_set = None

    def _make_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def _class_count(self) -> int | None:
        return None

    def _check_num_classes(self, found: int | None) -> None:
        if found is not None and found != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.num_classes} but {self.name} has {found} classes: "
                f"set data.num_classes={found}"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, test = self._make_splits()
        self._check_num_classes(self._class_count())
        train = self._train_subset(train)
        # debug=overfit (trainer.overfit_batches) trains without the augmentation recipe, as
        # data.augment=null did; read from the trainer so the debug overlay never writes data.*
        trainer = getattr(self, "_trainer", None)
        overfit = trainer is not None and bool(getattr(trainer, "overfit_batches", 0))
        train_tf = build_transform(self.img_size, True, self.mean, self.std, {} if overfit else self.augment)
        eval_tf = build_transform(self.img_size, False, self.mean, self.std)
        self.train_set = TransformedDataset(train, train_tf)
        self.val_set = TransformedDataset(val, eval_tf)
        self.test_set = TransformedDataset(test, eval_tf)

    def _train_subset(self, train: Dataset) -> Dataset:
        """``train`` itself, or its ``data.train_samples`` subset (stratified, nested, seeded)."""
        if self.train_samples is None:
            return train
        labels = dataset_labels(train)
        n = resolve_train_samples(self.train_samples, len(labels), len(np.unique(labels)))
        return Subset(train, stratified_subset(labels, n, self.split_seed).tolist())

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def split_sizes(self) -> dict[str, int]:
        return {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)}

    def report(self) -> DataReport:
        """Images per split and ``data/train_samples`` (the images trained on); empty before setup."""
        if self.train_set is None:
            return DataReport()
        sizes = self.split_sizes()
        metrics = {f"data/{k}_images": float(n) for k, n in sizes.items()}
        return DataReport(metrics={**metrics, "data/train_samples": float(sizes["train"])})


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 real 8x8 grey images,
    10 classes; no download). Upsampled to ``img_size`` so that the ViT sees enough patch tokens
    (16 px with patch 2 = 64 tokens). Fixed stratified split: 1,300 train / 200 val / 297 test."""

    name = "digits"
    SPLIT = (1300, 200, 297)

    def _make_splits(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        images = [Image.fromarray(p, mode="L") for p in pixels]
        parts = split_indices(digits.target, self.SPLIT, self.split_seed)
        full = PILListDataset(images, digits.target)
        return tuple(Subset(full, idx.tolist()) for idx in parts)

    def _class_count(self) -> int:
        return 10


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 / CIFAR-100 through torchvision. The official test set is the test split; a seeded,
    stratified ``val_size`` images of the official training set are the validation split.

    Args:
        variant: ``cifar10`` or ``cifar100``.
        download: let torchvision download the archive (needs network) when it is missing.
        val_size: images held out from the training set for validation.

    Raises:
        FileNotFoundError: the dataset is not under ``data_dir`` and ``download`` is false; the message
            says how to get it.
    """

    def __init__(self, variant: str = "cifar10", download: bool = False, val_size: int = 5000, **kwargs: Any) -> None:
        if variant not in ("cifar10", "cifar100"):
            raise ValueError(f"data.variant must be cifar10 or cifar100, got {variant!r}")
        super().__init__(**kwargs)
        self.variant, self.download, self.val_size = variant, download, val_size
        self.name = variant

    def _dataset_class(self):
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.variant == "cifar10" else CIFAR100

    def prepare_data(self) -> None:
        cls = self._dataset_class()
        root = self.data_dir / self.variant
        try:
            for train in (True, False):
                cls(root=str(root), train=train, download=self.download)
        except RuntimeError as err:
            folder = cls.base_folder
            raise FileNotFoundError(
                f"{self.variant} was not found in {root} (expected {root / folder}). Either run with "
                f"data.download=true (needs network), or download {cls.url} yourself and extract it "
                f"so that {root / folder} exists, or point paths.data_dir at the folder that holds "
                f"{self.variant}/{folder}."
            ) from err

    def _make_splits(self):
        self.prepare_data()
        cls = self._dataset_class()
        root = str(self.data_dir / self.variant)
        train_full = cls(root=root, train=True, download=False)
        test = cls(root=root, train=False, download=False)
        n = len(train_full)
        train_idx, val_idx = split_indices(train_full.targets, [n - self.val_size, self.val_size], self.split_seed)
        return Subset(train_full, train_idx.tolist()), Subset(train_full, val_idx.tolist()), test

    def _class_count(self) -> int:
        return 10 if self.variant == "cifar10" else 100


class TinyImageNetVal(Dataset):
    """Tiny-ImageNet's ``val/`` layout: ``val/images/*.JPEG`` with ``val/val_annotations.txt``
    (``file<TAB>wnid<TAB>box...`` lines), labelled with the training folder's class indices."""

    def __init__(self, folder: Path, class_to_idx: Mapping[str, int]) -> None:
        ann = folder / "val_annotations.txt"
        self.samples = []
        for line_no, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in class_to_idx:
                raise ValueError(f"{ann}:{line_no}: expected 'file<TAB>class' with a class of train/, got {line!r}")
            self.samples.append((folder / "images" / parts[0], class_to_idx[parts[1]]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as img:
            return img.convert("RGB"), label


def _unlabelled_tiny_imagenet_test(folder: Path) -> bool:
    """Tiny-ImageNet's ``test/``: ``test/images/*.JPEG`` without labels (not a split fibo can score)."""
    subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
    return subdirs == ["images"] and not (folder / "val_annotations.txt").is_file()


class ImageFolderDataModule(ImageDataModule):
    """Class-named folders (torchvision ``ImageFolder``), covering ImageNet and Tiny-ImageNet layouts.

    ``root/train/<class>/**/<image>`` is required. Splits:

    * ``root/test/<class>/...`` present: train / val / test as given (``val`` must exist too);
      Tiny-ImageNet's unlabelled ``test/images/`` does not count;
    * otherwise ``root/val`` is the test split (as papers report ImageNet-style val accuracy), and a
      seeded, stratified ``val_fraction`` of ``train`` is the validation split. ``root/val`` may be
      class folders or Tiny-ImageNet's ``images/`` + ``val_annotations.txt``.

    Raises:
        FileNotFoundError: ``root`` or ``root/train`` missing, naming the path and the layout.
    """

    def __init__(self, root: str | None = None, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not root:
            raise ValueError("data=imagefolder needs data.root=/path/to/dataset (with train/<class>/ images)")
        self.root = Path(os.path.expanduser(str(root)))
        self.val_fraction = val_fraction
        self.name = f"imagefolder:{self.root.name}"
        self._classes: list[str] | None = None

    def _folder(self, name: str):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(self.root / name), loader=lambda p: Image.open(p).convert("RGB"))

    def _make_splits(self):
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {train_dir} not found: data.root must hold train/<class_name>/<images> "
                f"(and val/ as class folders or Tiny-ImageNet's val/images + val_annotations.txt)"
            )
        train_full = self._folder("train")
        self._classes = train_full.classes
        self._check_num_classes(len(self._classes))
        val_dir, test_dir = self.root / "val", self.root / "test"
        if test_dir.is_dir() and not _unlabelled_tiny_imagenet_test(test_dir):
            if not val_dir.is_dir():
                raise FileNotFoundError(f"{self.root} has test/ but no val/: add val/<class>/ images")
            return train_full, self._labelled(val_dir, train_full.class_to_idx), self._labelled(test_dir, train_full.class_to_idx)
        n = len(train_full)
        n_val = max(1, round(self.val_fraction * n))
        train_idx, val_idx = split_indices(train_full.targets, [n - n_val, n_val], self.split_seed)
        test = self._labelled(val_dir, train_full.class_to_idx) if val_dir.is_dir() else None
        if test is None:
            raise FileNotFoundError(f"{self.root} has no val/ (used as the test split): add val/<class>/ images")
        return Subset(train_full, train_idx.tolist()), Subset(train_full, val_idx.tolist()), test

    def _labelled(self, folder: Path, class_to_idx: Mapping[str, int]) -> Dataset:
        if (folder / "val_annotations.txt").is_file():
            return TinyImageNetVal(folder, class_to_idx)
        ds = self._folder(folder.name)
        if ds.class_to_idx != dict(class_to_idx):
            missing = sorted(set(class_to_idx) ^ set(ds.class_to_idx))
            raise ValueError(f"class folders of {folder} differ from train/: {missing[:10]}")
        return ds

    def _class_count(self) -> int | None:
        return None if self._classes is None else len(self._classes)
