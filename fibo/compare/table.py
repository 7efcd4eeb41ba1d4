"""The comparison table: one record per group (``comparison.csv``), its printed / markdown rows and
the plot of the headline metric against the attention density (``comparison.png``)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from fibo.compare.groups import FLOPS_COLUMN, FLOPS_METRIC, LABELS, THROUGHPUT_METRIC, Group, variant_names

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
