"""``fibo-compare`` (or ``python -m fibo.compare``): compare MLflow runs side by side.

Reads the runs of one or more experiments (default ``fibo``; ``--filter`` narrows them with an
MLflow search string), groups runs whose configurations differ only in the seed (and in where they
wrote their files), and prints one line per group: task, dataset, model, attention variant,
attention density, seeds, n, mean ± std of the headline metric (default ``test/acc1``), the mean
training throughput and the mean wall time per run (MLflow start to end). So
``fibo-run -m attention=dense,fibottention seed=0,1,2`` compares in two lines.

It writes the table (``comparison.csv``, ``comparison.md``) and a plot of the metric against the
attention density (``comparison.png``: one point per group, error bars = std over seeds) to
``--out`` (default ``<root>/logs/compare/<time>/``) and logs the three files as artifacts of a new
MLflow run in the (first) compared experiment, tagged ``fibo.comparison=true`` so that later
comparisons leave it out (``--no-log``: don't). Runs that log ``cost/attention_flops``
(``fibo.cost.LogCost``) get an ``attn FLOPs`` column (per sample, forward), so comparisons "at
equal FLOPs" read off one table.

``--x PARAM`` (any logged param; ``data.train_samples`` or its MLflow key ``data/train_samples``)
draws curves instead: the metric against the param, one line per attention variant (runs equal
except the seed and the param), mean ± std over seeds as error bars and a band, a log x axis when
the values are positive and span 10x or more; the table pivots to rows = variants, columns = the
param's values, cells ``mean ± std (n)``. Runs without the param are left out with a note.

The store is the one ``fibo-run`` writes to: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///<root>/mlflow.db`` with root = ``$FIBO_ROOT`` or the current directory.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import os
import statistics
import sys
import time
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


def _fmt(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def format_flops(value: float) -> str:
    """``1234567`` -> ``"1.23M"``: 3 significant digits with k, M, G, T, P (powers of 1000); ``"-"`` for nan."""
    if math.isnan(value):
        return "-"
    value = float(f"{value:.3g}")  # round first, so 999,700 reads 1M, not 1e+03k
    for exp, unit in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10 ** exp:
            return f"{value / 10 ** exp:.3g}{unit}"
    return f"{value:.3g}"


def _has_flops(groups: list[Group]) -> bool:
    return any(FLOPS_METRIC in r.data.metrics for g in groups for r in g.runs)


def _common(g: Group, metric: str) -> float:
    """The one value of ``metric`` the group's runs share (density, FLOPs), else nan."""
    values = set(g.values(metric))
    return values.pop() if len(values) == 1 else math.nan


def _variant_record(g: Group, density_metric: str, with_flops: bool) -> dict:
    rec = {title: g.labels[name] for name, title in LABELS}
    rec["config"] = g.differs
    rec["density"] = _common(g, density_metric)
    if with_flops:
        rec["attention_flops"] = _common(g, FLOPS_METRIC)
    return rec


def records(groups: list[Group], metric: str, density_metric: str, with_status: bool) -> list[dict]:
    """One dict of raw values per group (what ``comparison.csv`` holds)."""
    out, with_flops = [], _has_flops(groups)
    for g in groups:
        rec = _variant_record(g, density_metric, with_flops)
        rec["seeds"] = " ".join(g.seeds)
        rec["n"] = len(g.values(metric))
        rec[f"{metric} mean"], rec[f"{metric} std"] = g.mean(metric), g.std(metric)
        rec["throughput"] = g.mean(THROUGHPUT_METRIC)
        rec["wall_min"] = g.wall_minutes()
        if with_status:
            rec["status"] = g.statuses
        rec["runs"] = " ".join(r.info.run_id for r in g.runs)
        out.append(rec)
    return out


NUMERIC = ("density", FLOPS_COLUMN, "n", "throughput/s", "wall min")


def _variant_row(rec: dict) -> dict[str, str]:
    row = {title: rec[title] for _, title in LABELS}
    row["config"] = rec["config"]
    row["density"] = "-" if math.isnan(rec["density"]) else f"{100 * rec['density']:.2f}%"
    if "attention_flops" in rec:
        row[FLOPS_COLUMN] = format_flops(rec["attention_flops"])
    return row


def _drop_empty_config(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    if not any(r["config"] for r in rows):
        for r in rows:
            del r["config"]
    return rows


def display_rows(recs: list[dict], metric: str) -> list[dict[str, str]]:
    """The table as printed: formatted strings, no run ids; the config column only when needed."""
    rows = []
    for rec in recs:
        mean, std = rec[f"{metric} mean"], rec[f"{metric} std"]
        row = _variant_row(rec)
        row["seeds"] = rec["seeds"].replace(" ", ",")
        row["n"] = str(rec["n"])
        row[metric] = "-" if math.isnan(mean) else f"{mean:.4f} ± {_fmt(std)}"
        row["throughput/s"] = _fmt(rec["throughput"], 1)
        row["wall min"] = _fmt(rec["wall_min"], 1)
        if "status" in rec:
            row["status"] = rec["status"]
        rows.append(row)
    return _drop_empty_config(rows)


def print_table(rows: list[dict[str, str]], right: set[str], title: str) -> None:
    """Print ``rows`` with rich; the columns in ``right`` are right-aligned (numbers)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold",
                         no_wrap=col not in ("config", "seeds", "status"), min_width=24 if col == "config" else None)
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    if not console.is_terminal:  # a pipe or a file: don't squeeze the table into 80 columns
        console = Console(width=int(os.environ.get("COLUMNS", "0") or 0) or 160)
    console.print(table)


def write_csv(recs: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(recs[0]))
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()} for rec in recs)


def write_markdown(rows: list[dict[str, str]], right: set[str], path: Path, title: str) -> None:
    cols = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(row[c].replace("|", "\\|") for c in cols) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(groups: list[Group], metric: str, density_metric: str, path: Path, title: str) -> list[str]:
    """Metric (mean, std error bars) against attention density, one labelled point per group.
    Returns the names of groups left out of the plot (no density or no metric value)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = variant_names(groups)
    points, left_out = [], []
    for g, name in zip(groups, names):
        x, y, err = g.mean(density_metric), g.mean(metric), g.std(metric)
        if math.isnan(x) or math.isnan(y):
            left_out.append(name)
        else:
            points.append((100 * x, y, 0.0 if math.isnan(err) else err, f"{name} (n={len(g.values(metric))})"))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (x, y, err, label) in enumerate(points):
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=4, color=cmap(i % 10), label=label)
        short = label if len(label) <= 40 else label[:37] + "..."
        rightmost = len(points) > 1 and x == max(p[0] for p in points)  # label it on its left
        ax.annotate(short, (x, y), textcoords="offset points", xytext=(-6 if rightmost else 6, 6), fontsize=8,
                    ha="right" if rightmost else "left", color=cmap(i % 10)).set_in_layout(False)
    xs = [p[0] for p in points]
    if xs and max(xs) / max(min(xs), 1e-9) > 10:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel(f"attention density ({density_metric})")
    ax.set_ylabel(f"{metric}\n(mean ± std over seeds)")
    ax.set_title(title if len(title) <= 90 else title[:87] + "...", fontsize=10)
    ax.grid(True, alpha=0.3)
    if points:
        ax.margins(x=0.25, y=0.25)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1 if len(points) > 4 else 2,
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return left_out


# -- curves: the metric against a param (--x) ---------------------------------------------------
@dataclass
class Curve:
    """One variant (runs equal except the seed and the x param) and its runs at each x value."""

    group: Group
    points: dict[str, Group]  # the x value (see x_of) -> the runs (seeds) with that value


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _missing(value) -> bool:
    return value in (None, "", "None")  # a null in the config is logged as the string None


def varying_params(runs) -> list[str]:
    """Params whose values differ between ``runs`` (absent counts as a value), names and paths left out."""
    keys = {k for r in runs for k in r.data.params if not any(fnmatch.fnmatchcase(k, p) for p in NAMES_AND_PATHS)}
    return sorted(k for k in keys if len({r.data.params.get(k) for r in runs}) > 1)


def resolve_param(runs, name: str) -> str:
    """The MLflow key of ``--x name``: as given, else with dots as slashes (fibo-run logs the config
    flattened with ``/``: ``data.train_samples`` -> ``data/train_samples``).

    Raises:
        CompareError: no run has the param; the message lists the params that vary.
    """
    have = {k for r in runs for k in r.data.params}
    for key in (name, name.replace(".", "/")):
        if key in have:
            return key
    varying = varying_params(runs)
    raise CompareError(f"no run has the param {name!r}; params that vary between these runs: "
                       + (", ".join(varying) or "none"))


#: Training-budget params that a sweep may pair with its x values (experiment=data_efficiency gives
#: every training-set size the same optimizer steps through its own epochs, validation interval
#: and warmup). Only these can go with the x axis; any other param that differs makes another line.
BUDGET_PARAMS = ("trainer/max_epochs", "trainer/max_steps", "trainer/check_val_every_n_epoch",
                 "trainer/val_check_interval", "task/warmup_epochs", "warmup_epochs")


def params_set_by(runs, param: str) -> list[str]:
    """The :data:`BUDGET_PARAMS` that the ``param`` value decides: single-valued among the runs at
    each value of ``param`` and not constant overall. On a curve they belong to the x axis, not to
    the variant."""
    out = []
    for key in varying_params(runs):
        if key == param or key not in BUDGET_PARAMS:
            continue
        at = {}
        for r in runs:
            at.setdefault(x_of(r, param), set()).add(r.data.params.get(key))
        if all(len(v) == 1 for v in at.values()):
            out.append(key)
    return out


def x_of(run, param: str) -> str:
    """The run's x value: the metric of the same name where the run logs one (``data/train_samples``
    is logged as given, e.g. ``0.2``, and as the number it resolved to, e.g. 260: counts and fractions
    then share one axis), else the param as logged."""
    value = run.data.metrics.get(param)
    if value is not None and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else repr(value)
    return run.data.params[param]


def x_values(curves: list[Curve]) -> list[str]:
    """All x values of the curves, in order: by number when every value is one, else as text."""
    values = {x for c in curves for x in c.points}
    if all(_is_number(v) for v in values):
        return sorted(values, key=float)
    return sorted(values, key=_numeric_first)


def make_curves(groups: list[Group], param: str) -> list[Curve]:
    """Split each group (grouped without ``param``) by the value of ``param``."""
    out = []
    for g in groups:
        points: dict[str, Group] = {}
        for run in g.runs:
            points.setdefault(x_of(run, param), Group(labels=g.labels, key=g.key, differs=g.differs)).runs.append(run)
        out.append(Curve(g, points))
    return out


def curve_records(curves: list[Curve], xs: list[str], param: str, metric: str, density_metric: str) -> list[dict]:
    """The pivoted table's raw values: one dict per variant with ``<param>=<x> mean/std/n`` per x value."""
    out, with_flops = [], _has_flops([c.group for c in curves])
    for c in curves:
        rec = _variant_record(c.group, density_metric, with_flops)
        for x in xs:
            p = c.points.get(x)
            rec[f"{param}={x} mean"] = p.mean(metric) if p else math.nan
            rec[f"{param}={x} std"] = p.std(metric) if p else math.nan
            rec[f"{param}={x} n"] = len(p.values(metric)) if p else 0
        rec["runs"] = " ".join(r.info.run_id for r in c.group.runs)
        out.append(rec)
    return out


def curve_rows(recs: list[dict], xs: list[str], param: str) -> list[dict[str, str]]:
    """The pivoted table as printed: a column ``<last part of param>=<x>`` per value, cells ``mean ± std (n)``."""
    short = param.rsplit("/", 1)[-1]
    rows = []
    for rec in recs:
        row = _variant_row(rec)
        for x in xs:
            mean, std, n = rec[f"{param}={x} mean"], rec[f"{param}={x} std"], rec[f"{param}={x} n"]
            row[f"{short}={x}"] = "-" if not n else f"{mean:.4f} ± {_fmt(std)} ({n})"
        rows.append(row)
    return _drop_empty_config(rows)


def plot_curves(curves: list[Curve], xs: list[str], param: str, metric: str, path: Path, title: str) -> str:
    """The metric against ``param``, one line per variant: mean with std error bars and band (std 0
    for a single seed). Numeric x values are placed by value, on a log axis when all are positive
    and span 10x or more; other values are evenly spaced in order. Returns the x scale
    (``log``, ``linear`` or ``categorical``)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    numeric = all(_is_number(x) for x in xs)
    pos = {x: float(x) if numeric else float(i) for i, x in enumerate(xs)}
    values = list(pos.values())
    scale = "categorical" if not numeric else \
        "log" if min(values) > 0 and max(values) / min(values) >= 10 else "linear"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (c, name) in enumerate(zip(curves, variant_names([c.group for c in curves]))):
        pts = [(pos[x], p.mean(metric), p.std(metric)) for x in xs if (p := c.points.get(x)) and p.values(metric)]
        if not pts:
            continue
        px, py, pe = zip(*pts)
        pe = [0.0 if math.isnan(e) else e for e in pe]
        color = cmap(i % 10)
        ax.errorbar(px, py, yerr=pe, fmt="-o", capsize=3, color=color, label=name)
        ax.fill_between(px, [y - e for y, e in zip(py, pe)], [y + e for y, e in zip(py, pe)], color=color, alpha=0.15,
                        linewidth=0)
    if scale == "log":
        ax.set_xscale("log")
    ax.set_xticks(values, xs)
    ax.minorticks_off()
    ax.set_xlabel(param + (" (log scale)" if scale == "log" else ""))
    ax.set_ylabel(f"{metric}\n(mean ± std over seeds)")
    ax.set_title(title if len(title) <= 90 else title[:87] + "...", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return scale


PAIRED_RIGHT = {"episodes", "both", "only A", "only B", "neither", "A solved", "B solved", "McNemar p"}


def paired_rollouts(client, groups: list[Group]) -> list[dict[str, str]]:
    """For rollout metrics: each pair of groups' final evaluations on the same episode seeds, runs
    matched by training seed (:func:`fibo.envs.paired.paired_rows`); groups without rollout artifacts
    are left out."""
    from fibo.envs.paired import final_outcomes, paired_rows

    names, outcomes = [], []
    for name, group in zip(variant_names(groups), groups):
        by_seed = {}
        for run in group.runs:
            found = final_outcomes(client, run.info.run_id)
            if found is not None:
                by_seed[_seed(run)] = found
        if by_seed:
            names.append(name)
            outcomes.append(by_seed)
    return paired_rows(names, outcomes)


def _client(tracking_uri: str):
    from fibo.store import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise CompareError(
            f"no MLflow store at {db}: run fibo-run first (in this directory, or with FIBO_ROOT), "
            f"or point --tracking-uri / MLFLOW_TRACKING_URI at a store")
    from fibo.store import TrackingError, check_tracking_server

    try:
        check_tracking_server(tracking_uri)  # an http(s) server that does not answer: one line in seconds
    except TrackingError as err:
        raise CompareError(str(err)) from None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def find_runs(client, experiment_names: list[str], filter_string: str, all_status: bool, tracking_uri: str):
    """The runs to compare (comparison runs left out), and the experiments they come from."""
    from mlflow.exceptions import MlflowException

    experiments = []
    for name in experiment_names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            known = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"no experiment {name!r} in {tracking_uri}; experiments there: "
                               + (", ".join(repr(k) for k in known) or "none"))
        experiments.append(exp)
    runs, token = [], None
    while True:
        try:
            page = client.search_runs([e.experiment_id for e in experiments], filter_string=filter_string,
                                      max_results=1000, page_token=token)
        except MlflowException as err:
            raise CompareError(f"MLflow refused --filter {filter_string!r}: {err.message}") from None
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if r.data.tags.get(COMPARISON_TAG) != "true"]
    where = ", ".join(repr(n) for n in experiment_names) + (f" matching {filter_string!r}" if filter_string else "")
    if not runs:
        raise CompareError(f"no runs in experiment {where}")
    if not all_status:
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if not finished:
            counts = ", ".join(f"{s} {n}" for s, n in sorted(Counter(r.info.status for r in runs).items()))
            raise CompareError(f"no FINISHED runs in experiment {where} ({counts}); "
                               f"--all-status compares them anyway")
        runs = finished
    return runs, experiments


@dataclass
class Comparison:
    groups: list[Group]
    records: list[dict]  # raw values per group (comparison.csv)
    rows: list[dict[str, str]]  # the printed table
    out_dir: Path
    files: dict[str, Path]
    run_id: str | None
    warnings: list[str]
    x: str | None = None  # the MLflow param of --x (curves), else None
    curves: list[Curve] = field(default_factory=list)
    xscale: str | None = None  # the curve plot's x axis: log, linear or categorical
    paired: list[dict[str, str]] = field(default_factory=list)  # rollout metrics: fibo.envs.paired.paired_rows


def compare(experiments: list[str] | None = None, filter_string: str = "", metric: str = DEFAULT_METRIC,
            tracking_uri: str | None = None, all_status: bool = False, out_dir: str | Path | None = None,
            log: bool = True, density_metric: str = DENSITY_METRIC, ignore_params: tuple[str, ...] = (),
            quiet: bool = False, x: str | None = None) -> Comparison:
    """Everything ``fibo-compare`` does; returns the groups, the table rows, the files and the run id.
    With ``x`` (a param), the table and plot are curves over that param (see the module docstring)."""
    experiments = list(experiments or ["fibo"])
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    runs, exps = find_runs(client, experiments, filter_string, all_status, uri)
    present = sorted({k for r in runs for k in r.data.metrics})
    if metric not in present:
        raise CompareError(f"no run has the metric {metric!r}; metrics of these runs: " + ", ".join(present))
    warnings = []
    missing = [r.info.run_name or r.info.run_id for r in runs if metric not in r.data.metrics]
    if missing:
        warnings.append(f"{len(missing)} run(s) without {metric} left out of the mean: " + ", ".join(sorted(missing)))
    ignored = IGNORED_PARAMS + tuple(ignore_params)
    param = None
    if x:
        param = resolve_param(runs, x)
        def has_x(r) -> bool:  # a null param (data.train_samples=null: all) counts where its metric says how many
            return not _missing(r.data.params.get(param)) or param in r.data.metrics

        without = sorted(r.info.run_name or r.info.run_id for r in runs if not has_x(r))
        runs = [r for r in runs if has_x(r)]
        if not runs:
            raise CompareError(f"no run has a value for {param} (all are null); choose another --x")
        if without:
            warnings.append(f"{len(without)} run(s) without {param} left out: " + ", ".join(without))
        with_x = [k for k in params_set_by(runs, param) if not any(fnmatch.fnmatchcase(k, p) for p in ignored)]
        if with_x:
            warnings.append(f"set with {param} (part of the x axis, not of the variants): " + ", ".join(with_x))
        ignored += (param, *with_x)
    groups = _sort(group_runs(runs, ignored), density_metric)
    what = f"{metric} by {param}" if param else metric
    title = f"{what} in {', '.join(experiments)}" + (f" [{filter_string}]" if filter_string else "") + \
        f": {len(runs)} runs, {len(groups)} groups"

    out = Path(out_dir) if out_dir else project_root() / "logs" / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "comparison.csv", "md": out / "comparison.md", "png": out / "comparison.png"}
    curves, xscale = [], None
    if param:
        curves = make_curves(groups, param)
        xs = x_values(curves)
        recs = curve_records(curves, xs, param, metric, density_metric)
        rows = curve_rows(recs, xs, param)
        right = set(NUMERIC) | set(list(rows[0])[-len(xs):])
        xscale = plot_curves(curves, xs, param, metric, files["png"], title)
    else:
        recs = records(groups, metric, density_metric, with_status=all_status)
        rows = display_rows(recs, metric)
        right = set(NUMERIC) | {metric}
        left_out = plot(groups, metric, density_metric, files["png"], title)
        if left_out:
            warnings.append(f"not in the plot (no {density_metric} or no {metric}): " + ", ".join(left_out))
    write_csv(recs, files["csv"])
    write_markdown(rows, right, files["md"], title)
    paired, paired_title = [], ""
    if metric.startswith("rollout/") and not param:
        paired = paired_rollouts(client, groups)
        if paired:
            files["paired"] = out / "paired.md"
            paired_title = (f"paired rollouts in {', '.join(experiments)}: the final evaluations on the same episode "
                            f"seeds, runs matched by training seed (fibo.envs.paired)")
            write_markdown(paired, PAIRED_RIGHT, files["paired"], paired_title)

    run_id = None
    if log:
        run = client.create_run(exps[0].experiment_id, run_name=f"comparison {what}", tags={
            COMPARISON_TAG: "true", "fibo.compared_runs": " ".join(r.info.run_id for r in runs)[:5000]})
        run_id = run.info.run_id
        try:
            for k, v in {"experiments": ",".join(experiments), "filter": filter_string or "-", "metric": metric,
                         "x": param or "-", "density_metric": density_metric, "all_status": all_status,
                         "runs": len(runs), "groups": len(groups)}.items():
                client.log_param(run_id, k, str(v))
            for path in files.values():
                client.log_artifact(run_id, str(path), "comparison")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")

    if not quiet:
        print_table(rows, right, title)
        if paired:
            print_table(paired, PAIRED_RIGHT, paired_title)
        for w in warnings:
            print(f"fibo-compare: note: {w}", file=sys.stderr)
        print(f"table: {files['csv']} and {files['md']}\nplot:  {files['png']}"
              + (f"\npaired: {files['paired']}" if paired else ""))
        if run_id:
            print(f"MLflow run {run_id} (tag {COMPARISON_TAG}=true) in experiment {experiments[0]!r} at {uri}")
    return Comparison(groups, recs, rows, out, files, run_id, warnings, param, curves, xscale, paired)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fibo-compare", description="\n\n".join(__doc__.split("\n\n")[1:5]).replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-e", "--experiment", action="append", default=None,
                   help="MLflow experiment to read (repeat for several; default: fibo)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`trainer/max_epochs` = '40'\" "
                   "or \"tags.`choice.data` = 'digits'\"")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="headline metric (default: test/acc1; robot runs: rollout/success_rate)")
    p.add_argument("--x", default=None, metavar="PARAM",
                   help="curves: the metric against this param (e.g. data.train_samples), one line per attention "
                   "variant; the table pivots to variants x values")
    p.add_argument("--density-metric", default=DENSITY_METRIC, help="x axis of the plot and the density column (default: attention/density_patch)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server (default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db, "
                   "root = $FIBO_ROOT or the current directory)")
    p.add_argument("--all-status", action="store_true", help="include runs that are not FINISHED (status shown)")
    p.add_argument("--ignore-param", action="append", default=[], metavar="PATTERN",
                   help="also group runs that differ in these params (fnmatch pattern, e.g. 'trainer/max_epochs')")
    p.add_argument("--out", default=None, help="folder for comparison.{csv,md,png} (default: <root>/logs/compare/<time>)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison as an MLflow run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console script ``fibo-compare``."""
    args = parse_args(argv)
    try:
        compare(args.experiment, args.filter, args.metric, args.tracking_uri, args.all_status, args.out,
                log=not args.no_log, density_metric=args.density_metric, ignore_params=tuple(args.ignore_param), x=args.x)
    except CompareError as err:
        print(f"fibo-compare: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
