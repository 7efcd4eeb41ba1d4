"""Runs -> groups: runs whose params are equal except the seed (and names and output paths) form
one group, labelled by their Hydra choices (task, data, model, attention). Also the constants,
the error and the default store that the rest of ``fibo.compare`` shares."""

from __future__ import annotations

import fnmatch
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_METRIC = "test/acc1"
DENSITY_METRIC = "attention/density_patch"  # the patch-to-patch block, as the paper counts it
THROUGHPUT_METRIC = "train/throughput"
COMPARISON_TAG = "fibo.comparison"
# Params that differ between the seeds of one configuration without changing what is trained:
# the seed, names, and where a run writes its files. Runs equal in every other param form a group.
NAMES_AND_PATHS = ("run_name", "*/run_name", "experiment_name", "*/experiment_name", "ckpt_path",
                   "paths/*", "logger/*", "*/data_dir", "*/dirpath", "*/default_root_dir")
IGNORED_PARAMS = ("seed", *NAMES_AND_PATHS)
FLOPS_METRIC = "cost/attention_flops"  # fibo.cost.LogCost: attention FLOPs per sample (forward)
FLOPS_COLUMN = "attn FLOPs"
MAX_DIFFERS = 3  # params named in the config column
LABELS = (("task", "task"), ("data", "dataset"), ("model", "model"), ("attention", "attention"))
_FALLBACK_PARAM = {"task": "task/_target_", "data": "data/_target_", "model": "model/name", "attention": "attention/name"}


class CompareError(Exception):
    """A problem with what was asked for (no such experiment, no runs, no such metric)."""


def project_root() -> Path:
    """Where ``fibo-run`` writes by default: ``$FIBO_ROOT``, else the current directory."""
    return Path(os.environ.get("FIBO_ROOT") or os.getcwd()).resolve()


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db`` (fibo-run's default store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


@dataclass
class Group:
    """Runs of one configuration that differ only in the seed."""

    labels: dict[str, str]
    key: tuple
    runs: list = field(default_factory=list)
    differs: str = ""  # params that set this group apart from others with the same labels

    def values(self, metric: str) -> list[float]:
        return [r.data.metrics[metric] for r in self.runs if metric in r.data.metrics
                and not math.isnan(r.data.metrics[metric])]

    def mean(self, metric: str) -> float:
        vals = self.values(metric)
        return statistics.fmean(vals) if vals else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation over the runs (n - 1); nan for fewer than 2 runs."""
        vals = self.values(metric)
        return statistics.stdev(vals) if len(vals) > 1 else math.nan

    def wall_minutes(self) -> float:
        """Mean wall time of the ended runs, MLflow start to end (minutes; training, evaluation and
        everything else the run did); nan when none has ended."""
        spans = [(r.info.end_time - r.info.start_time) / 60_000 for r in self.runs
                 if r.info.end_time and r.info.start_time]
        return statistics.fmean(spans) if spans else math.nan

    @property
    def seeds(self) -> list[str]:
        return sorted((_seed(r) for r in self.runs), key=_numeric_first)

    @property
    def statuses(self) -> str:
        return ", ".join(f"{s} {n}" for s, n in sorted(Counter(r.info.status for r in self.runs).items()))


def _numeric_first(text: str) -> tuple:
    """Sort key: integers by value (2 before 10), then anything else."""
    try:
        return (0, int(text), "")
    except ValueError:
        return (1, 0, text)


def _seed(run) -> str:
    return run.data.tags.get("seed") or run.data.params.get("seed") or "?"


def _label(run, name: str) -> str:
    value = run.data.tags.get(f"choice.{name}")
    if value in (None, "", "None"):
        value = run.data.params.get(_FALLBACK_PARAM[name], "?")
    return value


def _group_key(run, ignored: tuple[str, ...]) -> tuple:
    output_dir = run.data.tags.get("output_dir") or "\0"
    return tuple(sorted(
        (k, v) for k, v in run.data.params.items()
        if not any(fnmatch.fnmatchcase(k, pat) for pat in ignored) and output_dir not in v))


def _is_majority(value, values: list) -> bool:
    """Whether ``value`` is the one most common of ``values`` (a strict majority of the counts)."""
    counts = Counter(values).most_common()
    return counts[0][0] == value and (len(counts) == 1 or counts[0][1] > counts[1][1])


def group_runs(runs, ignored: tuple[str, ...] = IGNORED_PARAMS) -> list[Group]:
    """Groups runs whose params are equal except the ``ignored`` ones (the seed, names, paths)."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = _group_key(run, ignored)
        if key not in groups:
            groups[key] = Group(labels={name: _label(run, name) for name, _ in LABELS}, key=key)
        groups[key].runs.append(run)
    out = list(groups.values())
    for g in out:  # a label whose param is ignored (e.g. the --x param) can differ within a group
        for name, _ in LABELS:
            if len({_label(r, name) for r in g.runs}) > 1:
                g.labels[name] = "*"
    # Groups with the same task/data/model/attention labels: name the params that tell them apart.
    by_labels: dict[tuple, list[Group]] = {}
    for g in out:
        by_labels.setdefault(tuple(g.labels.values()), []).append(g)
    for same in by_labels.values():
        if len(same) > 1:
            dicts = [dict(g.key) for g in same]
            varying = sorted({k for d in dicts for k in d if len({d.get(k) for d in dicts}) > 1})
            # values that differ beat params that only some runs have (configs of older code versions)
            keys = [k for k in varying if all(k in d for d in dicts)] or varying
            patterns, unique = set(), []
            for k in keys:  # one of the params that vary alike (model/attention/* copies attention/*)
                pattern = tuple(d.get(k) for d in dicts)
                if pattern not in patterns:
                    patterns.add(pattern)
                    unique.append(k)
            for g, d in zip(same, dicts):
                # name the values in which this group departs from the most common one
                own = [k for k in unique if not _is_majority(d.get(k), [e.get(k) for e in dicts])] or unique
                shown = [f"{k}={d.get(k, '-')}" for k in own[:MAX_DIFFERS]]
                g.differs = " ".join(shown + ([f"+{len(own) - MAX_DIFFERS} more"] if len(own) > MAX_DIFFERS else []))
    return out


def _sort(groups: list[Group], density_metric: str) -> list[Group]:
    def key(g: Group):
        d = g.mean(density_metric)
        return (g.labels["task"], g.labels["data"], g.labels["model"], -(d if not math.isnan(d) else -1),
                g.labels["attention"], g.differs)
    return sorted(groups, key=key)


def variant_names(groups: list[Group]) -> list[str]:
    """Short names for plot labels: the labels that vary between the groups, plus what differs."""
    varying = [name for name, _ in LABELS if len({g.labels[name] for g in groups}) > 1] or ["attention"]
    return [" / ".join([g.labels[n] for n in varying] + ([g.differs] if g.differs else [])) for g in groups]
