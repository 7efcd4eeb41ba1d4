"""Image DataModules on real bundled data (digits) and on small datasets the tests write."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fibo.data.images import CIFARDataModule, DigitsDataModule, ImageFolderDataModule

COMMON = dict(img_size=16, num_classes=3, in_chans=3, batch_size=4, mean=[0.5] * 3, std=[0.5] * 3)


def test_digits_splits_are_fixed_and_disjoint():
    a = DigitsDataModule(img_size=16, in_chans=1, mean=[0.3], std=[0.4], split_seed=0, batch_size=64)
    b = DigitsDataModule(img_size=16, in_chans=1, mean=[0.3], std=[0.4], split_seed=0)
    a.setup(), b.setup()
    assert a.split_sizes() == {"train": 1300, "val": 200, "test": 297}
    idx = {k: set(getattr(a, f"{k}_set").base.indices) for k in ("train", "val", "test")}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    assert idx["test"] == set(b.test_set.base.indices)
    images, labels = next(iter(a.test_dataloader()))
    assert images.shape == (64, 1, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(10))
    # every class is present in every split (stratified)
    for split in ("train", "val", "test"):
        ds = getattr(a, f"{split}_set").base
        assert len({ds.dataset.labels[i] for i in ds.indices}) == 10


def test_non_square_images_as_timm_takes_them():
    """data.img_size=[16, 24]: (H, W) through timm's transforms, for training and evaluation."""
    from omegaconf import OmegaConf

    dm = DigitsDataModule(img_size=OmegaConf.create([16, 24]), in_chans=1, mean=[0.3], std=[0.4], batch_size=8,
                          augment={"scale": [0.85, 1.0], "ratio": [0.9, 1.1]})
    dm.setup()
    assert dm.img_size == (16, 24)
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        images, _ = next(iter(loader))
        assert images.shape == (8, 1, 16, 24)
    # an 8x8 digit resized (keeping its ratio, timm's eval resize) to 24x24 and centre-cropped to 16x24
    image = dm.test_set.base[0][0]
    assert tuple(dm.test_set.transform(image).shape) == (1, 16, 24)


@pytest.mark.parametrize("img_size, shown", [(0, "0"), (-16, "-16"), ([16, 0], "[16, 0]"), ([16, 24, 3], "[16, 24, 3]"),
                                             ("16", "'16'")])
def test_bad_image_sizes_are_refused_at_construction(img_size, shown):
    with pytest.raises(ValueError) as info:
        DigitsDataModule(img_size=img_size, in_chans=1, mean=[0.3], std=[0.4])
    assert str(info.value) == (f"data.img_size={shown} is not a positive side in pixels or [height, width] of positive "
                               "ints: e.g. data.img_size=32 or data.img_size=[16,24]")


def test_cifar_missing_says_how_to_get_it(tmp_path):
    dm = CIFARDataModule(variant="cifar10", data_dir=str(tmp_path), **{**COMMON, "num_classes": 10})
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert f"cifar10 was not found in {tmp_path / 'cifar10'}" in msg
    assert "data.download=true" in msg and "cifar-10-python.tar.gz" in msg


def _write_fake_cifar(root, per_class=4, classes=10):
    """The cifar-10-batches-py format (pickled dicts of uint8 rows), small."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = [i % classes for i in range(n)]
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": labels}

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch(per_class * classes)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(classes * 2)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(classes)]}))


def test_cifar_loader_on_written_data(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_fake_cifar(tmp_path)
    # our files are in the real format but have other md5 sums than the published archive
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    dm = CIFARDataModule(variant="cifar10", data_dir=str(tmp_path), val_size=20, **{**COMMON, "num_classes": 10})
    dm.setup()
    assert dm.split_sizes() == {"train": 180, "val": 20, "test": 20}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16)


def _write_folder(root, classes=("ant", "bee", "cat"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_train_val_layout(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=1 / 3, **COMMON)
    dm.setup()
    assert dm.split_sizes() == {"train": 12, "val": 6, "test": 6}
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 16, 16)


def test_imagefolder_and_cifar_train_samples(tmp_path, monkeypatch):
    """data.train_samples goes through the shared setup: a stratified subset of the train split only."""
    import torchvision.datasets.cifar as tv_cifar

    _write_folder(tmp_path / "folder" / "train", per_class=9)
    _write_folder(tmp_path / "folder" / "val", per_class=2)
    dm = ImageFolderDataModule(root=str(tmp_path / "folder"), val_fraction=1 / 3, train_samples=6, **COMMON)
    dm.setup()
    assert dm.split_sizes() == {"train": 6, "val": 9, "test": 6}
    assert sorted(label for _, label in dm.train_set) == [0, 0, 1, 1, 2, 2]
    _write_fake_cifar(tmp_path / "c")
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    dm = CIFARDataModule(variant="cifar10", data_dir=str(tmp_path / "c"), val_size=20, train_samples=0.5,
                         **{**COMMON, "num_classes": 10})
    dm.setup()
    assert dm.split_sizes() == {"train": 90, "val": 20, "test": 20}
    assert np.bincount([label for _, label in dm.train_set.base]).tolist() == [9] * 10


def test_imagefolder_tiny_imagenet_layout(tmp_path):
    classes = ("n01443537", "n01629819", "n01641577")
    for c in classes:
        (tmp_path / "train" / c / "images").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "train" / c / "images" / f"{c}_{i}.JPEG")
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for i, c in enumerate(classes * 2):
        Image.new("RGB", (20, 20)).save(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{c}\t0\t0\t10\t10")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    dm = ImageFolderDataModule(root=str(tmp_path), val_fraction=1 / 3, **COMMON)
    dm.setup()
    assert dm.split_sizes() == {"train": 6, "val": 3, "test": 6}
    assert sorted(label for _, label in dm.test_set.base) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'missing' / 'train'} not found"):
        ImageFolderDataModule(root=str(tmp_path / "missing"), **COMMON).setup()
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=1)
    with pytest.raises(ValueError, match="data.num_classes=5 but imagefolder:.* has 3 classes: set data.num_classes=3"):
        ImageFolderDataModule(root=str(tmp_path), **{**COMMON, "num_classes": 5}).setup()
    with pytest.raises(ValueError, match="needs data.root"):
        ImageFolderDataModule(root=None, **COMMON)


def test_image_datamodule_report():
    from fibo.data.images import DigitsDataModule
    from fibo.data.report import DataReport

    dm = DigitsDataModule(img_size=16)
    assert dm.report() == DataReport()  # before setup: nothing to report
    dm.setup()
    metrics = dm.report().metrics
    assert metrics == {"data/train_images": 1300, "data/val_images": 200, "data/test_images": 297,
                       "data/train_samples": 1300}  # sklearn digits: 1,797 images


def test_overfit_trains_without_the_augmentation_recipe():
    """debug=overfit sets trainer.overfit_batches only (no data.* keys); image data drop their recipe."""
    from types import SimpleNamespace

    from fibo.data.images import DigitsDataModule

    recipe = {"auto_augment": "rand-m9-mstd0.5-inc1"}
    normal, overfit, plain = (DigitsDataModule(img_size=16, augment=a) for a in (recipe, recipe, None))
    overfit._trainer = SimpleNamespace(overfit_batches=1)
    for dm in (normal, overfit, plain):
        dm.setup()
    assert "RandAugment" in repr(normal.train_set.transform)
    assert repr(overfit.train_set.transform) == repr(plain.train_set.transform)
