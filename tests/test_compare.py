"""``fibo-compare``: grouping of real fibo-run runs by seed, the numbers, the plot, the MLflow run, errors."""

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import mlflow_runs
from fibo import compare as fc


def _training_runs(root: Path):
    return mlflow_runs(root)


def _by_attention(runs):
    out = {}
    for r in runs:
        out.setdefault(r.data.tags["choice.attention"], []).append(r)
    return out


@pytest.mark.slow
def test_fibo_compare_command_on_a_real_sweep(sweep_2x2, tmp_path):
    """``fibo-compare`` from the project root: one line per attention variant, n=2, seeds 0,1, mean ±
    std equal to what MLflow holds, the PNG written and logged with the table as a comparison run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FIBO_ROOT")}
    env["COLUMNS"] = "200"  # the table's width (rich): not whatever the test runner's terminal had
    out = tmp_path / "out"
    result = subprocess.run([str(Path(sys.executable).with_name("fibo-compare")), "--out", str(out)],
                            cwd=sweep_2x2, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client, runs = _training_runs(sweep_2x2)
    assert len(runs) == 4
    by_att = _by_attention(runs)
    with (out / "comparison.csv").open() as fh:
        recs = {r["attention"]: r for r in csv.DictReader(fh)}
    assert sorted(recs) == ["dense", "fibottention"]
    for att, group in by_att.items():
        acc = [r.data.metrics["test/acc1"] for r in group]
        rec = recs[att]
        assert (rec["task"], rec["dataset"], rec["model"]) == ("image", "digits", "vit_nano")
        assert rec["n"] == "2" and rec["seeds"] == "0 1"
        assert float(rec["test/acc1 mean"]) == pytest.approx(statistics.fmean(acc), abs=1e-12)
        assert float(rec["test/acc1 std"]) == pytest.approx(statistics.stdev(acc), abs=1e-12)
        tput = statistics.fmean(r.data.metrics["train/throughput"] for r in group)
        assert float(rec["throughput"]) == pytest.approx(tput, rel=1e-12)
        assert float(rec["density"]) == pytest.approx(group[0].data.metrics["attention/density_patch"])
        assert set(rec["runs"].split()) == {r.info.run_id for r in group}
        # the printed table has the same numbers
        line = next(ln for ln in result.stdout.splitlines() if f" {att} " in ln)
        assert f"{statistics.fmean(acc):.4f} ± {statistics.stdev(acc):.4f}" in line and " 0,1 " in line
    assert float(recs["dense"]["density"]) == 1.0 and float(recs["fibottention"]["density"]) < 0.3

    png = out / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| dense |" in (out / "comparison.md").read_text()
    assert f"plot:  {png}" in result.stdout

    comparisons = [r for r in mlflow_runs(sweep_2x2, jobs_only=False)[1] if r.data.tags.get(fc.COMPARISON_TAG) == "true"]
    mine = [r for r in comparisons if r.info.run_id in result.stdout]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    run = mine[0]
    assert set(run.data.tags["fibo.compared_runs"].split()) == {r.info.run_id for r in runs}
    assert run.data.params["metric"] == "test/acc1" and run.data.params["groups"] == "2"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}
    assert logged == {"comparison/comparison.png", "comparison/comparison.csv", "comparison/comparison.md"}


@pytest.mark.slow
def test_comparison_runs_are_left_out_and_filter_and_metric_apply(sweep_2x2, tmp_path):
    uri = f"sqlite:///{sweep_2x2 / 'mlflow.db'}"
    first = fc.compare(tracking_uri=uri, out_dir=tmp_path / "a", quiet=True)
    second = fc.compare(tracking_uri=uri, out_dir=tmp_path / "b", quiet=True)  # sees first's run, ignores it
    assert [r["n"] for r in second.rows] == ["2", "2"] and second.records == first.records

    dense = fc.compare(tracking_uri=uri, filter_string="tags.`choice.attention` = 'dense'", metric="val/acc1",
                       out_dir=tmp_path / "c", log=False, quiet=True)
    assert dense.run_id is None and [g.labels["attention"] for g in dense.groups] == ["dense"]
    _, runs = _training_runs(sweep_2x2)
    val = [r.data.metrics["val/acc1"] for r in _by_attention(runs)["dense"]]
    assert dense.records[0]["val/acc1 mean"] == pytest.approx(statistics.fmean(val))


@pytest.mark.slow
def test_clear_errors_on_the_real_store(sweep_2x2, tmp_path):
    uri = f"sqlite:///{sweep_2x2 / 'mlflow.db'}"
    with pytest.raises(fc.CompareError) as err:
        fc.compare(["nope"], tracking_uri=uri, log=False, quiet=True, out_dir=tmp_path)
    assert str(err.value) == f"no experiment 'nope' in {uri}; experiments there: 'Default', 'fibo'"

    with pytest.raises(fc.CompareError) as err:
        fc.compare(metric="rollout/success_rate", tracking_uri=uri, log=False, quiet=True, out_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith("no run has the metric 'rollout/success_rate'; metrics of these runs: attention/density, ")
    assert "test/acc1" in msg and "train/throughput" in msg

    with pytest.raises(fc.CompareError) as err:
        fc.compare(filter_string="params.seed = '7'", tracking_uri=uri, log=False, quiet=True, out_dir=tmp_path)
    assert str(err.value) == "no runs in experiment 'fibo' matching \"params.seed = '7'\""

    with pytest.raises(fc.CompareError) as err:
        fc.compare(filter_string="nonsense ~ 1", tracking_uri=uri, log=False, quiet=True, out_dir=tmp_path)
    assert str(err.value).startswith("MLflow refused --filter 'nonsense ~ 1': ")


def _store_with_a_failed_run(tmp_path: Path) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fibo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(exp, run_name="crashed", tags={"choice.attention": "dense", "seed": "0"})
    client.log_param(run.info.run_id, "attention/name", "dense")
    client.log_metric(run.info.run_id, "test/acc1", 0.5)
    client.set_terminated(run.info.run_id, "FAILED")
    return uri


def test_no_finished_runs_is_a_clear_error_and_all_status_shows_them(tmp_path, capsys):
    uri = _store_with_a_failed_run(tmp_path)
    capsys.readouterr()  # MLflow's own log lines from creating the store
    assert fc.main(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == ("fibo-compare: error: no FINISHED runs in experiment 'fibo' (FAILED 1); "
                                       "--all-status compares them anyway\n")
    result = fc.compare(tracking_uri=uri, all_status=True, out_dir=tmp_path / "out", log=False, quiet=True)
    assert result.rows[0]["status"] == "FAILED 1" and result.rows[0]["test/acc1"] == "0.5000 ± -"
    assert result.warnings == [f"not in the plot (no {fc.DENSITY_METRIC} or no test/acc1): dense"]


def test_missing_default_store_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FIBO_ROOT", str(tmp_path))
    assert fc.main([]) == 1
    assert capsys.readouterr().err == (
        f"fibo-compare: error: no MLflow store at {tmp_path / 'mlflow.db'}: run fibo-run first (in this directory, "
        "or with FIBO_ROOT), or point --tracking-uri / MLFLOW_TRACKING_URI at a store\n")
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create an empty store


def test_unreachable_server_is_one_line_within_seconds(capsys):
    """An MLflow server that does not answer (issue 11 item 3): MLflow alone retried for minutes and
    then printed a traceback; fibo-compare probes it and stops with one line naming the URI."""
    import time

    start = time.perf_counter()
    assert fc.main(["--tracking-uri", "http://127.0.0.1:1"]) == 1
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "fibo-compare: error: MLflow tracking server http://127.0.0.1:1 is unreachable (")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in err


def test_default_store_follows_fibo_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FIBO_ROOT", str(tmp_path))
    assert fc.default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert fc.default_tracking_uri() == "http://127.0.0.1:5000"


def _fake_run(run_id, attention, seed, epochs=10, out="/r/logs/runs/x", acc=0.9):
    params = {"seed": str(seed), "run_name": f"{attention}-s{seed}", "attention/name": attention,
              "trainer/max_epochs": str(epochs), "paths/output_dir": f"{out}{run_id}",
              "callbacks/model_checkpoint/dirpath": f"{out}{run_id}/checkpoints", "some/path": f"{out}{run_id}/x"}
    tags = {"choice.attention": attention, "choice.task": "image", "choice.data": "digits",
            "choice.model": "vit_nano", "seed": str(seed), "output_dir": f"{out}{run_id}"}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=params["run_name"], status="FINISHED"),
                           data=SimpleNamespace(params=params, tags=tags, metrics={"test/acc1": acc}))


def test_grouping_ignores_seed_and_paths_and_names_what_differs():
    runs = [_fake_run("a", "dense", 0), _fake_run("b", "dense", 1), _fake_run("c", "dense", 2, epochs=40),
            _fake_run("d", "fibottention", 10), _fake_run("e", "fibottention", 2)]
    groups = fc.group_runs(runs)
    got = sorted((g.labels["attention"], g.differs, g.seeds) for g in groups)
    assert got == [("dense", "trainer/max_epochs=10", ["0", "1"]), ("dense", "trainer/max_epochs=40", ["2"]),
                   ("fibottention", "", ["2", "10"])]
    one = next(g for g in groups if g.labels["attention"] == "dense" and len(g.runs) == 1)
    assert math.isnan(one.std("test/acc1")) and one.mean("test/acc1") == 0.9


# -- curves (--x) on real MLflow runs written here ------------------------------------------------
ACC = {  # attention -> train_samples -> test/acc1 of seeds 0, 1, ...
    "dense": {"100": [0.50, 0.54, 0.52], "400": [0.80, 0.84], "1300": [0.95]},
    "fibottention": {"100": [0.55, 0.57, 0.59], "400": [0.82, 0.86], "1300": [0.96, 0.97]},
}
DENSITY = {"dense": 1.0, "fibottention": 0.0936}
FLOPS = {"dense": 6_489_600.0, "fibottention": 623_616.0}


def _log_run(client, exp, attention: str, seed: int, train_samples: str | None, acc: float, epochs: str = "40") -> str:
    name = f"vit_nano-{attention}-digits-s{seed}" + (f"-n{train_samples}" if train_samples else "")
    out = f"/r/logs/runs/{name}"
    run = client.create_run(exp, run_name=name, tags={
        "choice.task": "image", "choice.data": "digits", "choice.model": "vit_nano", "choice.attention": attention,
        "seed": str(seed), "output_dir": out})
    params = {"seed": str(seed), "run_name": name, "attention/name": attention, "trainer/max_epochs": epochs,
              "paths/output_dir": out, "callbacks/model_checkpoint/dirpath": f"{out}/checkpoints"}
    if train_samples is not None:
        params["data/train_samples"] = train_samples
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in {"test/acc1": acc, "attention/density_patch": DENSITY[attention],
                 fc.FLOPS_METRIC: FLOPS[attention], "train/throughput": 400.0}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return name


@pytest.fixture
def curve_store(tmp_path):
    """A real SQLite store: dense and fibottention at train_samples 100/400/1300 (1-3 seeds each), one
    run of an older config without data/train_samples and one with train_samples null."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fibo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    for attention, by_x in ACC.items():
        for x, accs in by_x.items():
            for seed, acc in enumerate(accs):
                _log_run(client, exp, attention, seed, x, acc)
    old = _log_run(client, exp, "dense", 5, None, 0.97)
    null = _log_run(client, exp, "fibottention", 6, "None", 0.97)
    return uri, client, sorted([old, null])


def test_curves_pivot_the_table_and_draw_one_line_per_variant(curve_store, tmp_path, capsys):
    uri, client, excluded = curve_store
    result = fc.compare(tracking_uri=uri, x="data.train_samples", out_dir=tmp_path / "out")
    assert result.x == "data/train_samples" and result.xscale == "log"  # 100..1300 spans 13x
    # one group per variant: not split by the x param nor by the seed
    assert sorted(g.labels["attention"] for g in result.groups) == ["dense", "fibottention"]
    assert [len(g.runs) for g in result.groups] == [6, 7]
    rows = {r["attention"]: r for r in result.rows}
    assert list(rows["dense"]) == ["task", "dataset", "model", "attention", "density", "attn FLOPs",
                                   "train_samples=100", "train_samples=400", "train_samples=1300"]
    assert [rows["dense"][f"train_samples={x}"] for x in ("100", "400", "1300")] == [
        "0.5200 ± 0.0200 (3)", "0.8200 ± 0.0283 (2)", "0.9500 ± - (1)"]
    assert [rows["fibottention"][f"train_samples={x}"] for x in ("100", "400", "1300")] == [
        "0.5700 ± 0.0200 (3)", "0.8400 ± 0.0283 (2)", "0.9650 ± 0.0071 (2)"]
    assert (rows["dense"]["density"], rows["dense"]["attn FLOPs"]) == ("100.00%", "6.49M")
    assert (rows["fibottention"]["density"], rows["fibottention"]["attn FLOPs"]) == ("9.36%", "624k")
    assert result.warnings == [f"2 run(s) without data/train_samples left out: {excluded[0]}, {excluded[1]}"]

    with (tmp_path / "out" / "comparison.csv").open() as fh:
        recs = {r["attention"]: r for r in csv.DictReader(fh)}
    for att, by_x in ACC.items():
        for x, accs in by_x.items():
            assert float(recs[att][f"data/train_samples={x} mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-12)
            assert recs[att][f"data/train_samples={x} n"] == str(len(accs))
        assert float(recs[att]["attention_flops"]) == FLOPS[att]
    assert recs["dense"]["data/train_samples=1300 std"] == ""  # one seed: no std
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md.startswith("# test/acc1 by data/train_samples in fibo: 13 runs, 2 groups\n")
    assert "| image | digits | vit_nano | dense | 100.00% | 6.49M | 0.5200 ± 0.0200 (3) | 0.8200 ± 0.0283 (2) |" in md
    png = tmp_path / "out" / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    out = capsys.readouterr()
    assert f"fibo-compare: note: 2 run(s) without data/train_samples left out: {excluded[0]}, {excluded[1]}\n" in out.err
    run = client.get_run(result.run_id)
    assert run.data.params["x"] == "data/train_samples" and run.data.params["groups"] == "2"
    assert {a.path for a in client.list_artifacts(result.run_id, "comparison")} == {
        "comparison/comparison.png", "comparison/comparison.csv", "comparison/comparison.md"}


def test_params_the_x_value_decides_belong_to_the_x_axis(tmp_path):
    """experiment=data_efficiency trains each size for the same steps, so trainer/max_epochs goes with
    data/train_samples: the curve keeps one line per variant and the note names the param."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fibo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    epochs = {"100": "150", "400": "46"}
    for attention in ("dense", "fibottention"):
        for x, ep in epochs.items():
            for seed in (0, 1):
                _log_run(client, exp, attention, seed, x, 0.5 + 0.1 * seed, epochs=ep)
    result = fc.compare(tracking_uri=uri, x="data.train_samples", out_dir=tmp_path, log=False, quiet=True)
    assert [(g.labels["attention"], len(g.runs)) for g in result.groups] == [("dense", 4), ("fibottention", 4)]
    assert [r["train_samples=100"] for r in result.rows] == ["0.5500 ± 0.0707 (2)"] * 2
    assert result.warnings == ["set with data/train_samples (part of the x axis, not of the variants): trainer/max_epochs"]


def test_x_is_the_resolved_count_and_other_configs_make_their_own_line(tmp_path):
    """data.train_samples=0.2 and =null are logged as given and resolved in the metric of the same
    name (260, 1300): they share the axis with counts. A run of another task at the same x makes its
    own line (only training-budget params go with the x axis)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fibo", artifact_location=(tmp_path / "mlartifacts").as_uri())
    for given, resolved in (("100", 100), ("0.2", 260), ("None", 1300)):
        run_id = client.search_runs([exp], f"attributes.run_name = '{_log_run(client, exp, 'dense', 0, given, 0.5)}'")[0].info.run_id
        client.log_metric(run_id, "data/train_samples", resolved)
    video = _log_run(client, exp, "dense", 0, "100", 0.9)
    video_id = client.search_runs([exp], f"attributes.run_name = '{video}'")[0].info.run_id
    client.log_param(video_id, "task/_target_", "fibo.tasks.video.VideoClassifier")
    client.log_metric(video_id, "data/train_samples", 100)
    result = fc.compare(tracking_uri=uri, x="data.train_samples", out_dir=tmp_path, log=False, quiet=True)
    assert [list(r)[-3:] for r in result.rows] == [["train_samples=100", "train_samples=260", "train_samples=1300"]] * 2
    assert sorted(len(g.runs) for g in result.groups) == [1, 3]
    assert result.warnings == []


def test_curves_linear_axis_and_the_mlflow_key_form(curve_store, tmp_path):
    uri, _, _ = curve_store
    result = fc.compare(tracking_uri=uri, x="data/train_samples", filter_string="params.`data/train_samples` != '1300'",
                        out_dir=tmp_path, log=False, quiet=True)
    assert result.xscale == "linear"  # 100..400: less than 10x
    assert [list(r)[-2:] for r in result.rows] == [["train_samples=100", "train_samples=400"]] * 2


def test_curves_unknown_param_is_one_line_naming_the_params_that_vary(curve_store, tmp_path, capsys):
    uri, _, _ = curve_store
    capsys.readouterr()
    assert fc.main(["--tracking-uri", uri, "--x", "data.nope", "--out", str(tmp_path), "--no-log"]) == 1
    assert capsys.readouterr().err == ("fibo-compare: error: no run has the param 'data.nope'; params that vary "
                                       "between these runs: attention/name, data/train_samples, seed\n")


def test_the_plain_table_has_a_flops_column_when_runs_log_it(curve_store, tmp_path):
    uri, _, _ = curve_store
    result = fc.compare(tracking_uri=uri, out_dir=tmp_path, log=False, quiet=True,
                        filter_string="params.`data/train_samples` = '100'")
    assert [(r["attention"], r["attn FLOPs"], r["n"]) for r in result.rows] == [("dense", "6.49M", "3"),
                                                                                ("fibottention", "624k", "3")]
    assert [r["attention_flops"] for r in result.records] == [FLOPS["dense"], FLOPS["fibottention"]]


def test_without_cost_metrics_there_is_no_flops_column(tmp_path):
    uri = _store_with_a_failed_run(tmp_path)
    result = fc.compare(tracking_uri=uri, all_status=True, out_dir=tmp_path / "out", log=False, quiet=True)
    assert "attn FLOPs" not in result.rows[0] and "attention_flops" not in result.records[0]


@pytest.mark.parametrize("value, text", [(6_489_600, "6.49M"), (623_616, "624k"), (999_700, "1M"), (512, "512"),
                                         (2.5e9, "2.5G"), (3.0e12, "3T"), (math.nan, "-")])
def test_format_flops(value, text):
    assert fc.format_flops(value) == text


def test_curves_over_a_text_param_are_evenly_spaced_and_a_varying_label_reads_star(curve_store, tmp_path):
    uri, _, _ = curve_store
    result = fc.compare(tracking_uri=uri, x="attention/name", filter_string="params.`data/train_samples` = '100'",
                        out_dir=tmp_path, log=False, quiet=True)
    assert result.xscale == "categorical" and len(result.groups) == 1
    row = result.rows[0]
    assert row["attention"] == "*"  # the x param sets it: not one value for the row
    assert (row["density"], row["attn FLOPs"]) == ("-", "-")  # nor one density or cost
    assert (row["name=dense"], row["name=fibottention"]) == ("0.5200 ± 0.0200 (3)", "0.5700 ± 0.0200 (3)")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
