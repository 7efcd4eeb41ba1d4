"""Dataset lineage: the train/val/test data a run used, as MLflow dataset inputs.

Each split becomes one :class:`SplitDataset` (an MLflow ``MetaDataset``: metadata only, the data
stay where they are) logged with ``MlflowClient.log_inputs`` under the input context
``training`` / ``validation`` / ``test`` (tag ``mlflow.data.context``, what ``mlflow.log_input``
sets), so the UI's run page lists them and two runs on different data show different datasets:

* ``name``: ``<dataset>-<split>`` (``digits-train``, ``moving_digits-val``, ``lift_d100_noise0.1_s0-train``);
* ``source``: where the data are read from, a local path (``mlflow.data.sources.LocalArtifactDatasetSource``:
  source type ``local``): the image folder, the CIFAR batches, the video folder or list file, the
  HDF5 file; for the bundled digits the scikit-learn file ``digits.csv.gz``;
* ``digest``: 10 hex characters of a SHA-256 over the source, the split and the samples it holds
  (the indices into the source and their labels; for files, their paths), so a training subset
  (``data.train_samples``) or another split seed gives another digest;
* ``profile``: ``{"num_samples": n, "split": ...}`` (videos: videos; robot: demos and samples).

Which data modules: any with ``train_set``/``val_set``/``test_set`` datasets (the image modules),
``datasets`` of clip datasets with ``samples`` (video) or ``train_demos``/``valid_demos`` and a
``path`` (robomimic HDF5; its "test" is the rollouts, not a dataset). Anything else logs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fibo")

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DIGEST_CHARS = 10  # MLflow recommends at most 10


@dataclass
class Split:
    """One split of a data module: ``dataset`` name, ``split`` (train/val/test), ``source`` (a local
    path), ``num_samples`` and what identifies its samples (``identity``: hashed into the digest)."""

    dataset: str
    split: str
    source: str
    num_samples: int
    identity: list = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.split}"

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.source, self.split, self.num_samples], default=str).encode())
        for part in self.identity:
            h.update(part if isinstance(part, bytes) else json.dumps(part, default=str).encode())
        return h.hexdigest()[:DIGEST_CHARS]


def _meta_dataset_class():
    from mlflow.data.meta_dataset import MetaDataset

    class SplitDataset(MetaDataset):
        """MLflow's ``MetaDataset`` with a profile (the base class logs none)."""

        def __init__(self, source, name: str, digest: str, profile: dict[str, Any]) -> None:
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return SplitDataset


def to_mlflow_dataset(split: Split):
    """The MLflow dataset (``mlflow.data.dataset.Dataset``) of ``split``, its source a local path
    (MLflow's ``LocalArtifactDatasetSource``: source type ``local``)."""
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(split.source)
    profile = {"num_samples": split.num_samples, "split": split.split, **split.profile}
    return _meta_dataset_class()(source, split.name, split.digest(), profile)


# -- what each kind of data module holds -------------------------------------------------------------


def _unwrap(dataset) -> tuple[Any, Any]:
    """``(leaf dataset, indices into it or None)`` through ``TransformedDataset.base`` and nested
    ``Subset``s."""
    import numpy as np
    from torch.utils.data import Subset

    indices = None
    while True:
        if isinstance(dataset, Subset):
            idx = np.asarray(dataset.indices, dtype=np.int64)
            indices = idx if indices is None else idx[indices]
            dataset = dataset.dataset
        elif hasattr(dataset, "base") and hasattr(dataset, "transform"):
            dataset = dataset.base
        else:
            return dataset, indices


def _image_source(datamodule, leaf, split: str) -> str:
    root = getattr(datamodule, "root", None)
    if root is not None:  # an image folder (ImageFolder leaves know their own folder)
        return str(Path(getattr(leaf, "root", root)).resolve())
    if getattr(datamodule, "name", "") == "digits":
        from importlib.resources import files

        return str(files("sklearn.datasets") / "data" / "digits.csv.gz")
    base = getattr(leaf, "base_folder", None)  # torchvision CIFAR
    folder = Path(getattr(leaf, "root", datamodule.data_dir))
    return str((folder / base if base else folder).resolve())


def _image_splits(datamodule) -> list[Split]:
    import numpy as np

    from fibo.data.images import dataset_labels

    out = []
    for split in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{split}_set", None)
        if dataset is None:
            continue
        leaf, indices = _unwrap(dataset)
        labels = dataset_labels(dataset)
        identity = [np.ascontiguousarray(labels).tobytes()]
        if indices is not None:
            identity.append(np.ascontiguousarray(indices).tobytes())
        samples = getattr(leaf, "samples", None)  # ImageFolder: (path, label)
        if samples is not None:
            paths = [str(p) for p, _ in samples]
            identity.append([paths[i] for i in indices] if indices is not None else paths)
        out.append(Split(str(datamodule.name), split, _image_source(datamodule, leaf, split), len(dataset), identity,
                         {"num_classes": int(datamodule.num_classes)}))
    return out


def _video_splits(datamodule) -> list[Split]:
    lists = getattr(datamodule, "lists", {}) or {}
    root = getattr(datamodule, "root", None)
    name = Path(root).name if root is not None else Path(str(lists.get("train"))).stem
    out = []
    for split, dataset in datamodule.datasets.items():
        listed = lists.get(split) or (lists.get("val") if split == "test" else None)
        source = listed if listed else (Path(root) / split if (Path(root) / split).is_dir() else Path(root) / "val")
        identity = [[(str(s[0]), int(s[1])) for s in dataset.samples]]
        out.append(Split(name, split, str(Path(source).resolve()), len(dataset.samples), identity,
                         {"num_classes": int(datamodule.num_classes), "unit": "videos"}))
    return out


def _robot_splits(datamodule) -> list[Split]:
    lengths = (datamodule.info or {}).get("lengths", {})
    path = Path(datamodule.path).resolve()
    out = []
    for split, demos in (("train", datamodule.train_demos), ("val", datamodule.valid_demos)):
        if demos:
            out.append(Split(path.stem, split, str(path), int(sum(lengths.get(d, 0) for d in demos)), [list(demos)],
                             {"num_demos": len(demos), "unit": "samples"}))
    return out


def splits_of(datamodule) -> list[Split]:
    """The splits a set-up data module holds (module docstring); empty before ``setup`` or for a
    kind of module this does not know."""
    if datamodule is None:
        return []
    if getattr(datamodule, "datasets", None) and hasattr(datamodule, "lists"):
        return _video_splits(datamodule)
    if hasattr(datamodule, "train_demos") and getattr(datamodule, "info", None) is not None:
        return _robot_splits(datamodule)
    if getattr(datamodule, "train_set", None) is not None and hasattr(datamodule, "split_sizes"):
        return _image_splits(datamodule)
    return []


def log_datasets(client, run_id: str, datamodule, contexts: dict[str, str] | None = None,
                 only: tuple[str, ...] | None = None) -> list[Split]:
    """Log the splits of ``datamodule`` (:func:`splits_of`; ``only`` some of them) as dataset inputs
    of MLflow run ``run_id`` (``client``: an ``MlflowClient``), context from ``contexts`` (default
    :data:`CONTEXTS`). Returns what was logged. Never raises: lineage must not hide a run's outcome
    (a failure is a warning)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    contexts = {**CONTEXTS, **(contexts or {})}
    try:
        splits = [s for s in splits_of(datamodule) if only is None or s.split in only]
        inputs = [DatasetInput(to_mlflow_dataset(s)._to_mlflow_entity(),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, contexts[s.split])]) for s in splits]
        if inputs:
            client.log_inputs(run_id, datasets=inputs)
        return splits
    except Exception as err:  # noqa: BLE001
        log.warning("could not log the dataset inputs: %s", err)
        return []
