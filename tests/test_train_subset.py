"""data.train_samples on real data (scikit-learn's digits): nested, stratified, seeded subsets of the
training split with val/test unchanged, the errors, and the logged data/train_samples."""

import numpy as np
import pytest

from fibo.data.images import DigitsDataModule
from fibo.data.subset import resolve_train_samples, seeded_prefix, stratified_subset

DIGITS = dict(img_size=16, in_chans=1, mean=[0.3], std=[0.4])


def digits(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**DIGITS, **kwargs)
    dm.setup()
    return dm


def dataset_indices(subset) -> list[int]:
    """Indices into the full digits set of a (possibly nested) Subset."""
    from torch.utils.data import Subset

    if not isinstance(subset, Subset):
        return list(range(len(subset)))
    inner = dataset_indices(subset.dataset)
    return [inner[i] for i in subset.indices]


def test_stratified_subset_is_nested_and_proportional_on_digits():
    from sklearn.datasets import load_digits

    labels = load_digits().target  # 1,797 labels, 10 classes of 174..183
    shares = np.bincount(labels) / len(labels)
    previous = np.array([], dtype=np.int64)
    for n in range(10, len(labels) + 1, 7):
        idx = stratified_subset(labels, n, seed=3)
        assert len(idx) == n == len(set(idx.tolist())) and (np.diff(idx) > 0).all()
        assert set(previous.tolist()) <= set(idx.tolist()), n  # nested
        counts = np.bincount(labels[idx], minlength=10)
        assert np.abs(counts - n * shares).max() < 1, (n, counts)  # within one of proportional
        previous = idx
    assert not np.array_equal(stratified_subset(labels, 100, 3), stratified_subset(labels, 100, 4))
    assert np.array_equal(stratified_subset(labels, 100, 3), stratified_subset(labels, 100, 3))


def test_every_class_gets_one_even_when_rare():
    labels = np.repeat([0, 1, 2], [50, 20, 2])  # class 2's share of 5 samples is 0.14
    idx = stratified_subset(labels, 5, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 1, 1]
    previous = set()
    for n in range(3, 73):  # still nested while classes catch up after the first one each
        current = set(stratified_subset(labels, n, seed=0).tolist())
        assert previous <= current
        previous = current


def test_digits_train_samples_nested_stratified_val_test_unchanged():
    full, a100, a200, again = digits(), digits(train_samples=100), digits(train_samples=200), digits(train_samples=100)
    train = {name: set(dataset_indices(dm.train_set.base)) for name, dm in
             [("full", full), ("100", a100), ("200", a200), ("again", again)]}
    assert (len(train["100"]), len(train["200"]), len(train["full"])) == (100, 200, 1300)
    assert train["100"] < train["200"] < train["full"]
    assert train["100"] == train["again"]
    labels = np.asarray(full.train_set.base.dataset.labels)
    full_counts = np.bincount(labels[sorted(train["full"])], minlength=10)
    for n in (100, 200):
        counts = np.bincount(labels[sorted(train[str(n)])], minlength=10)
        assert np.abs(counts - n * full_counts / 1300).max() <= 1, counts
    for split in ("val", "test"):
        assert dataset_indices(getattr(a100, f"{split}_set").base) == dataset_indices(getattr(full, f"{split}_set").base)
    assert a100.split_sizes() == {"train": 100, "val": 200, "test": 297}
    other_seed = digits(train_samples=100, split_seed=1)
    assert set(dataset_indices(other_seed.train_set.base)) != train["100"]
    assert len(digits(train_samples=0.5).train_set) == 650
    assert len(digits(train_samples=1.0).train_set) == 1300


def test_digits_report_and_mlflow_log_the_train_samples(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from fibo.tracking import log_data_report

    dm = digits(train_samples=100)
    assert dm.report().metrics == {"data/train_images": 100.0, "data/val_images": 200.0, "data/test_images": 297.0,
                                   "data/train_samples": 100.0}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="subset", tracking_uri=uri)
    log_data_report(logger, dm)
    assert MlflowClient(uri).get_run(logger.run_id).data.metrics["data/train_samples"] == 100.0


RANGE = ("give an integer from 10 (one per class, 10 classes) to 1300 (all 1300 training samples), "
         "a fraction in (0, 1], or data.train_samples=null for all")


@pytest.mark.parametrize("value, message", [
    (5, f"data.train_samples=5 is out of range: {RANGE}"),
    (0, f"data.train_samples=0 is out of range: {RANGE}"),
    (-100, f"data.train_samples=-100 is out of range: {RANGE}"),
    (1301, f"data.train_samples=1301 is out of range: {RANGE}"),
    (1.5, f"data.train_samples=1.5 is a fraction outside (0, 1]: {RANGE}"),
    (0.0, f"data.train_samples=0.0 is a fraction outside (0, 1]: {RANGE}"),
    (0.001, f"data.train_samples=0.001 (1 samples) is out of range: {RANGE}"),
    ("all", f"data.train_samples='all' is not a number: {RANGE}"),
])
def test_digits_bad_train_samples_say_the_range(value, message):
    with pytest.raises(ValueError) as info:
        digits(train_samples=value)
    assert str(info.value) == message


def test_demo_counts():
    assert resolve_train_samples(None, 5, key="data.num_demos", unit="demos", fractions=False) is None
    with pytest.raises(ValueError) as info:
        resolve_train_samples(0.5, 5, key="data.num_demos", unit="demos", fractions=False)
    assert str(info.value) == ("data.num_demos=0.5 is not an integer: give an integer from 1 to 5 (all 5 training "
                               "demos), or data.num_demos=null for all")
    names = [f"demo_{i}" for i in range(20)]
    subsets = [seeded_prefix(names, n, seed=0) for n in range(1, 21)]
    assert all(set(a) < set(b) for a, b in zip(subsets, subsets[1:]))
    assert subsets[-1] == names and subsets[4] == sorted(subsets[4], key=names.index)
