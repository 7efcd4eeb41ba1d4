"""``fibo-compare --x PARAM``: the headline metric against a param, one curve per variant (runs
equal except the seed and the param), as a pivoted table and a plot."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

from fibo.compare.groups import NAMES_AND_PATHS, CompareError, Group, _numeric_first, variant_names
from fibo.compare.table import _drop_empty_config, _fmt, _has_flops, _variant_record, _variant_row

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
