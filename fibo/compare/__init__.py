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

With a rollout metric (``--metric rollout/success_rate``, ``rollout/success_rate_best``, ...) it also
pairs the groups' final evaluations episode by episode (the same initial states; runs matched by
training seed): solved by both, only A, only B, neither, and an exact McNemar p-value
(``paired.md``; :mod:`fibo.envs.paired`).

The store is the one ``fibo-run`` writes to: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///<root>/mlflow.db`` with root = ``$FIBO_ROOT`` or the current directory.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fibo.compare.curves import (Curve, curve_records, curve_rows, make_curves, params_set_by, plot_curves,
                                 resolve_param, x_values, _missing)
from fibo.compare.groups import (COMPARISON_TAG, DEFAULT_METRIC, DENSITY_METRIC, FLOPS_COLUMN, FLOPS_METRIC,
                                 IGNORED_PARAMS, THROUGHPUT_METRIC, CompareError, Group, _seed, _sort,
                                 default_tracking_uri, group_runs, project_root, variant_names)
from fibo.compare.table import (NUMERIC, display_rows, format_flops, plot, print_table, records, write_csv,
                                write_markdown)

__all__ = ["COMPARISON_TAG", "DEFAULT_METRIC", "DENSITY_METRIC", "FLOPS_COLUMN", "FLOPS_METRIC", "IGNORED_PARAMS",
           "NUMERIC", "THROUGHPUT_METRIC", "CompareError", "Comparison", "Curve", "Group", "compare",
           "default_tracking_uri", "format_flops", "group_runs", "main", "paired_rollouts", "project_root"]

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
