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
    client, runs = mlflow_runs(root)
    return client, [r for r in runs if r.data.tags.get(fc.COMPARISON_TAG) != "true"]


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

    comparisons = [r for r in mlflow_runs(sweep_2x2)[1] if r.data.tags.get(fc.COMPARISON_TAG) == "true"]
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
