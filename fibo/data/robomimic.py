"""robomimic-format demonstrations (HDF5) as a LightningDataModule over robomimic's own
``SequenceDataset``: frame stacking and action chunks with padding at episode edges, the
``mask/train`` / ``mask/valid`` filter keys, observation keys from the config and normalisation
statistics computed on the training demos.

The same module reads fibo's generated demos (:mod:`fibo.envs.demos`) and robomimic's official
datasets (e.g. ``lift/ph/image.hdf5``). A batch is ``{"obs": {key: (B, F, ...)}, "actions":
(B, T, A), "pad_mask": (B, T), "obs_pad_mask": (B, F)}`` with F = ``frame_stack`` observations up to
the current step (images as float ``(3, H, W)`` in [0, 1], robomimic's ``process_obs`` convention)
and T = ``seq_length`` actions from the current step; ``pad_mask`` is False where an action was
repeated past the end of the episode, ``obs_pad_mask`` where the first observation was repeated
before its start (robomimic's padding: edge values repeated).

Files without ``mask/``: all demos are used, with a seeded ``valid_fraction`` of them held out for
validation (a warning says so). Files without ``data.attrs["env_args"]`` train normally; rollouts
are then refused with a message (:mod:`fibo.envs.evaluation`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fibo.data.report import DataReport
from fibo.data.subset import resolve_train_samples, seeded_prefix

log = logging.getLogger("fibo")


class DatasetError(ValueError):
    """A robomimic HDF5 file that does not fit the configuration (the message names what and the fix)."""


def _demo_sort_key(name: str):
    try:
        return int(name.split("_", 1)[1])
    except (IndexError, ValueError):
        return name


def inspect_hdf5(path: str | os.PathLike, rgb_keys: Sequence[str] = (), low_dim_keys: Mapping[str, int] | Sequence[str] = (),
                 action_dim: int | None = None) -> dict[str, Any]:
    """Check a robomimic HDF5 file against the configured keys and return what it holds:
    ``demos``, ``lengths``, ``masks`` (filter key -> demo names), ``env_args`` (str or None),
    ``shapes`` (obs key -> per-step shape), ``action_dim``.

    Raises:
        FileNotFoundError: the file is missing.
        DatasetError: no ``data`` group or no demos; a configured observation key is missing (lists the
            keys that exist) or has another size; actions of another dimension; a demo whose observations,
            actions and ``num_samples`` disagree in length (names the demo).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"robomimic dataset {path} not found: generate demos with `python -m fibo.envs.demos "
                                f"--env lift --out {path}` or point data.path at an existing robomimic .hdf5 file")
    low_dim = dict(low_dim_keys) if isinstance(low_dim_keys, Mapping) else {k: None for k in low_dim_keys}
    with h5py.File(path, "r") as f:
        if "data" not in f or not len(f["data"]):
            raise DatasetError(f"{path} has no demonstrations: robomimic files keep them as data/demo_<i> groups")
        demos = sorted(f["data"].keys(), key=_demo_sort_key)
        first = f["data"][demos[0]]
        if "obs" not in first:
            raise DatasetError(f"{path}: data/{demos[0]} has no obs group")
        existing = sorted(first["obs"].keys())
        for key in [*rgb_keys, *low_dim]:
            if key not in first["obs"]:
                raise DatasetError(f"{path}: observation key {key!r} is not in data/{demos[0]}/obs; the file has "
                                   f"{existing} (set data.rgb_keys / data.low_dim_keys to keys that exist)")
        shapes = {k: tuple(first["obs"][k].shape[1:]) for k in existing}
        for key in rgb_keys:
            shape = shapes[key]
            if len(shape) != 3 or shape[-1] != 3:
                raise DatasetError(f"{path}: {key!r} has per-step shape {shape}, not an (H, W, 3) RGB image; put it in "
                                   f"data.low_dim_keys or choose an image key")
        for key, dim in low_dim.items():
            actual = int(np.prod(shapes[key]))
            if dim is not None and actual != int(dim):
                raise DatasetError(f"{path}: {key!r} has {actual} dimensions but data.low_dim_keys says {dim}: "
                                   f"set data.low_dim_keys.{key}={actual}")
        if "actions" not in first:
            raise DatasetError(f"{path}: data/{demos[0]} has no actions")
        file_action_dim = int(first["actions"].shape[1])
        if action_dim is not None and file_action_dim != int(action_dim):
            raise DatasetError(f"{path}: actions have {file_action_dim} dimensions but data.action_dim={action_dim}: "
                               f"set data.action_dim={file_action_dim}")
        lengths = {}
        for name in demos:
            demo = f["data"][name]
            n_act = int(demo["actions"].shape[0])
            counts = {f"obs/{k}": int(demo["obs"][k].shape[0]) for k in [*rgb_keys, *low_dim] if k in demo["obs"]}
            missing = [k for k in [*rgb_keys, *low_dim] if k not in demo["obs"]]
            if missing:
                raise DatasetError(f"{path}: data/{name}/obs lacks {missing} (data/{demos[0]} has them); every demo "
                                   f"needs the configured observation keys")
            num_samples = int(demo.attrs.get("num_samples", n_act))
            bad = {k: v for k, v in counts.items() if v != n_act}
            if bad or num_samples != n_act:
                raise DatasetError(f"{path}: demo {name} is inconsistent: {n_act} actions but "
                                   + ", ".join(f"{k} has {v} steps" for k, v in bad.items())
                                   + (f"{', ' if bad else ''}num_samples={num_samples}" if num_samples != n_act else "")
                                   + "; every obs key, actions and num_samples must have one entry per step")
            if n_act < 1:
                raise DatasetError(f"{path}: demo {name} has no steps")
            lengths[name] = n_act
        masks = {}
        if "mask" in f:
            for key in f["mask"]:
                masks[key] = [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in np.array(f["mask"][key][:])]
        env_args = f["data"].attrs.get("env_args")
        if isinstance(env_args, bytes):
            env_args = env_args.decode("utf-8")
    return {"demos": demos, "lengths": lengths, "masks": masks, "env_args": env_args or None, "shapes": shapes,
            "action_dim": file_action_dim}


def split_demos(info: Mapping[str, Any], train_filter: str | None, valid_filter: str | None, valid_fraction: float,
                seed: int, path: str = "the dataset") -> tuple[list[str], list[str]]:
    """Train/valid demo names from the file's filter keys, or (no ``mask/`` or the filter keys absent)
    all demos with a seeded ``valid_fraction`` held out, with a warning.

    Raises:
        DatasetError: the train filter names demos that do not exist, or shares demos with the valid
            filter (names the first five and the count).
    """
    masks = info["masks"]
    demos = list(info["demos"])
    if train_filter is None:
        return demos, []
    if train_filter in masks:
        train = masks[train_filter]
        unknown = sorted(set(train) - set(demos), key=_demo_sort_key)
        if unknown:
            raise DatasetError(f"{path}: mask/{train_filter} names demos that do not exist: {unknown[:5]}")
        valid = masks.get(valid_filter, []) if valid_filter else []
        if valid_filter and valid_filter not in masks:
            log.warning("%s has no mask/%s: validating on nothing (filter keys: %s)", path, valid_filter, sorted(masks))
        shared = sorted(set(train) & set(valid), key=_demo_sort_key)
        if shared:
            more = f", ... ({len(shared)} in all)" if len(shared) > 5 else ""
            raise DatasetError(f"{path}: mask/{train_filter} and mask/{valid_filter} share {len(shared)} demo(s) "
                               f"({', '.join(shared[:5])}{more}), so validation would score demos seen in training: "
                               f"fix the file's masks so that no demo is in both, or choose other filter keys "
                               f"(data.train_filter / data.valid_filter; data.valid_filter=null validates on nothing)")
        return train, list(valid)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(demos))
    n_valid = int(round(valid_fraction * len(demos))) if len(demos) > 1 else 0
    n_valid = min(max(n_valid, 1 if valid_fraction > 0 and len(demos) > 1 else 0), len(demos) - 1)
    valid = sorted((demos[i] for i in order[:n_valid]), key=_demo_sort_key)
    train = [d for d in demos if d not in set(valid)]
    log.warning("%s has no mask/%s filter key (it has %s): training on %d of its %d demos and validating on a seeded "
                "%.0f%% (%d demos, data.split_seed=%d)", path, train_filter, sorted(masks) or "no mask/ group",
                len(train), len(demos), 100 * valid_fraction, len(valid), seed)
    return train, valid


def compute_stats(path: str | os.PathLike, demos: Sequence[str], low_dim_keys: Sequence[str],
                  std_min: float = 1e-2) -> dict[str, Any]:
    """Mean, std (floored at ``std_min``), min and max of actions and of each low-dim observation over ``demos``.
    Each floored dimension is named in one warning (a constant dimension, e.g. a gripper that never
    moves, is then centred but not scaled)."""
    import h5py

    with h5py.File(path, "r") as f:
        def stats(name: str) -> dict[str, list[float]]:
            x = np.concatenate([np.asarray(f[f"data/{d}/{name}"][:], dtype=np.float64).reshape(f[f"data/{d}/{name}"].shape[0], -1)
                                for d in demos])
            std = x.std(0)
            floored = np.flatnonzero(std < std_min)
            if floored.size:
                log.warning("%s: std below %g in dimension(s) %s of %d (%s) over the training demos: floored at %g "
                            "(data.std_min)", name, std_min, floored.tolist(), std.size,
                            ", ".join(f"{v:.3g}" for v in std[floored]), std_min)
            return {"mean": x.mean(0).tolist(), "std": np.maximum(std, std_min).tolist(),
                    "min": x.min(0).tolist(), "max": x.max(0).tolist()}

        return {"actions": stats("actions"), "obs": {k: stats(f"obs/{k}") for k in low_dim_keys}}


class SequenceData(Dataset):
    """robomimic's ``SequenceDataset`` for ``demos`` (a list, so files without filter keys work too),
    returning ``frame_stack`` observations and ``seq_length`` actions per sample (see the module doc)."""

    def __init__(self, path: str | os.PathLike, demos: Sequence[str], rgb_keys: Sequence[str], low_dim_keys: Sequence[str],
                 frame_stack: int = 1, seq_length: int = 1, hdf5_cache_mode: str | None = "low_dim") -> None:
        import robomimic.utils.obs_utils as ObsUtils
        from robomimic.utils.dataset import SequenceDataset

        ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"rgb": list(rgb_keys), "low_dim": list(low_dim_keys)}})

        class _Demos(SequenceDataset):  # robomimic reads mask/<filter>; fibo passes the demo list itself
            def load_demo_info(self, filter_by_attribute=None, demos=None):
                return super().load_demo_info(filter_by_attribute, list(demo_list) if demos is None else demos)

        demo_list = list(demos)
        self.rgb_keys, self.low_dim_keys = list(rgb_keys), list(low_dim_keys)
        self.frame_stack, self.seq_length = int(frame_stack), int(seq_length)
        self.dataset = _Demos(
            hdf5_path=str(path), obs_keys=self.rgb_keys + self.low_dim_keys, dataset_keys=("actions",),
            frame_stack=self.frame_stack, seq_length=self.seq_length, pad_frame_stack=True, pad_seq_length=True,
            get_pad_mask=True, goal_mode=None, hdf5_cache_mode=hdf5_cache_mode, hdf5_use_swmr=True,
            hdf5_normalize_obs=False, filter_by_attribute=None, load_next_obs=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]  # sequences of frame_stack - 1 + seq_length steps
        f = self.frame_stack
        obs = {}
        for key in self.rgb_keys:
            obs[key] = torch.from_numpy(np.ascontiguousarray(item["obs"][key][:f])).permute(0, 3, 1, 2).float() / 255.0
        for key in self.low_dim_keys:
            x = np.asarray(item["obs"][key][:f], dtype=np.float32)
            obs[key] = torch.from_numpy(x.reshape(f, -1))
        actions = torch.from_numpy(np.asarray(item["actions"][f - 1:], dtype=np.float32))
        mask = np.asarray(item["pad_mask"][:, 0], dtype=bool)
        return {"actions": actions, "obs": obs, "pad_mask": torch.from_numpy(mask[f - 1:]),
                "obs_pad_mask": torch.from_numpy(mask[:f])}


class RobomimicDataModule(L.LightningDataModule):
    """Demonstrations from a robomimic HDF5 file (see the module docstring).

    Args:
        path: the .hdf5 file.
        rgb_keys: image observation keys (``<camera>_image``).
        low_dim_keys: ``{key: dim}`` of low-dim observations (checked against the file).
        action_dim: checked against the file.
        frame_stack, seq_length: observations per sample (history) and actions per sample (chunk).
        generate: if the file is missing, keyword arguments of :func:`fibo.envs.demos.write_demos`
            to create it (``None``: a missing file is an error).
        train_filter, valid_filter: filter keys under ``mask/``; ``valid_fraction``, ``split_seed``: the
            fallback split when the file has no ``mask/<train_filter>``.
        hdf5_cache_mode: robomimic's: ``low_dim`` (default; images read from disk), ``all`` or null.
        img_size: camera image side (rollouts render at this size).
        rollout_horizon: maximum steps of an evaluation episode (used by the rollout callback).
        std_min: floor of the normalisation std.
        object_dim: size of the ``object`` observation (what ``model=policy_oracle`` adds).
        num_demos: train on a subset of the training demos: ``None`` (all) or a number, drawn by
            ``split_seed`` and nested (the 10-demo set is inside the 20-demo set); validation unchanged.

    Raises:
        ValueError (at construction): ``num_demos`` more than the training demos ``generate`` will make
            (checked before generating them).
        DatasetError / ValueError (at setup): see :func:`inspect_hdf5`, :func:`split_demos`;
            ``num_demos`` not between 1 and the number of training demos.
    """

    modality = "robot"  # the task family this data serves (fibo.config_check.check_task_data)

    def __init__(self, path: str, rgb_keys: Sequence[str] = ("agentview_image",),
                 low_dim_keys: Mapping[str, int] | None = None, action_dim: int = 7, frame_stack: int = 1,
                 seq_length: int = 1, batch_size: int = 64, num_workers: int = 0, generate: Mapping[str, Any] | None = None,
                 train_filter: str = "train", valid_filter: str | None = "valid", valid_fraction: float = 0.1,
                 split_seed: int = 0, hdf5_cache_mode: str | None = "low_dim", img_size: int = 84,
                 rollout_horizon: int = 150, std_min: float = 1e-2, object_dim: int | None = None,
                 num_demos: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.rgb_keys = list(rgb_keys or [])
        self.low_dim_keys = dict(low_dim_keys or {})
        self.action_dim = action_dim
        self.frame_stack, self.seq_length = int(frame_stack), int(seq_length)
        if self.frame_stack < 1 or self.seq_length < 1:
            raise ValueError(f"data.frame_stack={frame_stack} and data.seq_length={seq_length} must be >= 1")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.generate = dict(generate) if generate else None
        self.train_filter, self.valid_filter = train_filter, valid_filter
        self.valid_fraction, self.split_seed = valid_fraction, split_seed
        self.hdf5_cache_mode = hdf5_cache_mode
        from fibo.data.transforms import check_img_size

        img_size = check_img_size(img_size, square_only="robot camera images are square (rendered img_size x img_size)")
        self.img_size, self.rollout_horizon, self.std_min = img_size, rollout_horizon, std_min
        self.object_dim, self.num_demos = object_dim, num_demos
        self._check_num_demos_before_generating()
        self.info: dict[str, Any] | None = None
        self.train_demos: list[str] = []
        self.valid_demos: list[str] = []
        self._stats: dict[str, Any] | None = None
        self.train_set = self.val_set = None

    # -- preparation ------------------------------------------------------------------------------
    def _check_num_demos_before_generating(self) -> None:
        """``data.num_demos`` against the training demos that ``generate`` will write, when the file is
        still to be generated (minutes of simulation): refused now rather than after them.

        Raises:
            ValueError: the one line of :func:`fibo.data.subset.resolve_train_samples`, plus how many
                training demos ``data.generate.num_demos`` makes.
        """
        if self.generate is None or self.num_demos is None or self.path.is_file():
            return
        from fibo.envs.demos import valid_count

        generated = int(self.generate.get("num_demos", 100))
        train = generated - valid_count(generated, float(self.generate.get("valid_fraction", 0.1)))
        try:
            resolve_train_samples(self.num_demos, train, key="data.num_demos", unit="demos", fractions=False)
        except ValueError as err:
            raise ValueError(f"{err} (checked before generating {self.path.name}: data.generate.num_demos={generated} "
                             f"makes {train} training demos; raise it for more)") from None

    def prepare_data(self) -> None:
        if not self.path.is_file() and self.generate is not None:
            from fibo.envs.demos import write_demos

            log.info("generating demonstrations into %s (%s)", self.path, self.generate)
            write_demos(self.path, **self.generate)

    def setup(self, stage: str | None = None) -> None:
        if self.info is not None:
            return
        self.prepare_data()  # also when used outside a Trainer
        self.info = inspect_hdf5(self.path, self.rgb_keys, self.low_dim_keys, self.action_dim)
        self.train_demos, self.valid_demos = split_demos(self.info, self.train_filter, self.valid_filter,
                                                         self.valid_fraction, self.split_seed, str(self.path))
        if not self.train_demos:
            raise DatasetError(f"{self.path}: mask/{self.train_filter} is empty: no demos to train on")
        n = resolve_train_samples(self.num_demos, len(self.train_demos), key="data.num_demos", unit="demos",
                                  fractions=False)
        if n is not None:
            self.train_demos = seeded_prefix(self.train_demos, n, self.split_seed)
        self._stats = compute_stats(self.path, self.train_demos, list(self.low_dim_keys), self.std_min)
        make = lambda demos: SequenceData(self.path, demos, self.rgb_keys, list(self.low_dim_keys), self.frame_stack,  # noqa: E731
                                          self.seq_length, self.hdf5_cache_mode)
        self.train_set = make(self.train_demos)
        self.val_set = make(self.valid_demos) if self.valid_demos else None

    # -- what the task and the rollouts need --------------------------------------------------------
    def normalization_stats(self) -> dict[str, Any]:
        """Action and low-dim observation mean/std over the training demos (computed in ``setup``)."""
        if self._stats is None:
            self.setup("fit")
        return self._stats

    @property
    def env_args(self) -> str | None:
        """The file's ``data.attrs["env_args"]`` JSON (None if it has none)."""
        if self.info is None:
            self.setup("fit")
        return self.info["env_args"]

    def report(self) -> DataReport:
        """Demo and sample counts of the training split (empty before setup)."""
        if self.info is None:
            return DataReport(metrics={})
        lengths = self.info["lengths"]
        return DataReport(metrics={"data/train_demos": len(self.train_demos), "data/valid_demos": len(self.valid_demos),
                "data/train_samples": sum(lengths[d] for d in self.train_demos),
                "data/mean_demo_length": float(np.mean([lengths[d] for d in self.train_demos]))})

    # -- loaders ------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

