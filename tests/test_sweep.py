"""``fibo-run -m``: one MLflow parent run per sweep (Hydra callback fibo.sweep.MlflowSweepParent), every
job a child run, the sweep's comparison on the parent; Optuna sweeps (hydra/sweeper=optuna_fibo)."""

import csv

import pytest

from conftest import mlflow_runs

pytestmark = pytest.mark.slow


def _parent_and_children(root):
    client, runs = mlflow_runs(root, "fibo-debug", jobs_only=False)
    parents = [r for r in runs if r.data.tags.get("fibo.sweep") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children)
    return client, parent, children


def test_a_two_job_multirun_has_one_parent_with_the_comparison_and_two_children(run_fibo, tmp_path):
    result = run_fibo("-m", "debug=fast_dev_run", "seed=0,1", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("sweep ")
    assert parent.data.params["overrides"] == "debug=fast_dev_run seed=0,1"
    assert parent.data.params["jobs_planned"] == "2" and parent.data.params["jobs"] == "2"
    assert parent.data.params["sweeper"].endswith("BasicSweeper") and parent.data.params["metric"] == "test/acc1"
    assert parent.data.tags["fibo.comparison"] == "true"  # later fibo-compare runs leave it out
    assert sorted(c.data.tags["seed"] for c in children) == ["0", "1"]
    assert sorted(c.data.tags["fibo.sweep.job"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}
    local = client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path / "dl"))
    (row,) = list(csv.DictReader(open(local)))  # seeds 0 and 1 of one configuration: one group
    assert set(row["runs"].split()) == {c.info.run_id for c in children} and row["n"] == "2"


def test_a_failed_job_fails_the_parent(run_fibo, tmp_path):
    result = run_fibo("-m", "debug=fast_dev_run", "task.lr=1e-3,-1", root=tmp_path)
    assert result.returncode != 0
    _, parent, children = _parent_and_children(tmp_path)
    assert [c.info.status for c in children] == ["FINISHED"]  # task.lr=-1 stops before its run starts
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "1"
    assert parent.data.tags["error"] == "the job with overrides debug=fast_dev_run task.lr=-1 did not finish"
    assert "jobs" not in parent.data.params  # the sweep never reached its end


def test_a_two_trial_optuna_sweep_has_two_child_runs(run_fibo, tmp_path):
    result = run_fibo("-m", "hydra/sweeper=optuna_fibo", "hydra.sweeper.n_trials=2", "debug=fast_dev_run", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parent, children = _parent_and_children(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    params = parent.data.params
    assert params["sweeper"].endswith("OptunaSweeper") and params["jobs_planned"] == "2" and params["jobs"] == "2"
    assert params["direction"] == "maximize"  # test/acc1
    assert params["search_space"] == ("task.lr=tag(log, interval(1e-4, 1e-2)) task.weight_decay=interval(0.0, 0.1) "
                                      "attention.w_min=range(3, 9)")
    lrs = [float(c.data.params["task/lr"]) for c in children]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(3 <= int(c.data.params["attention/w_min"]) <= 8 for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {"sweep/optimization_results.yaml"}
    best = max(c.data.metrics["test/acc1"] for c in children)
    assert f"Best value: {best}" in result.stdout + result.stderr


def test_the_optuna_direction_follows_the_headline_metric():
    from fibo.sweep import direction

    assert direction(True, "test/acc1", "val/acc1") == "maximize"
    assert direction("false", "test/acc1", "rollout/success_rate") == "maximize"
    assert direction(False, "test/acc1", "val/loss") == "minimize"
    assert direction(True, "test/action_mse", "val/loss") == "minimize"


def test_a_sweep_of_no_trial_stops_in_one_line_and_leaves_no_run(run_fibo, tmp_path):
    """Before: Optuna's 'No trials are completed yet.' traceback, and the parent run left KILLED."""
    result = run_fibo("-m", "hydra/sweeper=optuna_fibo", "hydra.sweeper.n_trials=0", "debug=fast_dev_run",
                      root=tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fibo-run: error: hydra.sweeper.n_trials=0 runs no trial: pass hydra.sweeper.n_trials>=1, e.g. "
        "hydra.sweeper.n_trials=20"]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_on_an_unreachable_server_stops_before_any_job(run_fibo, tmp_path):
    """Before: Hydra turned the callback's error into a warning and every job failed on its own."""
    result = run_fibo("-m", "seed=0,1", "debug=fast_dev_run", root=tmp_path, timeout=300,
                      env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fibo-run: error: MLflow tracking server http://127.0.0.1:1 is unreachable")
    assert not (tmp_path / "logs" / "multiruns").exists() or not any((tmp_path / "logs" / "multiruns").rglob("*.log"))


@pytest.mark.parametrize("code,status", [(1, "FAILED"), (143, "KILLED"), (None, "KILLED")])
def test_the_parent_ends_by_how_the_process_exits(tmp_path, code, status):
    """The sweeper raised (Hydra prints it, exits 1): FAILED with the reason; SIGTERM (143) or an exit
    without a code (Ctrl-C): KILLED."""
    from mlflow.tracking import MlflowClient

    from fibo import sweep

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = sweep.MlflowSweepParent()
    parent.client, parent.experiment = client, "fibo"
    parent.run_id = client.create_run(client.create_experiment("fibo")).info.run_id
    sweep.note_exit(code)
    try:
        parent._end_at_exit()
    finally:
        sweep.note_exit(None)
    run = client.get_run(parent.run_id)
    assert run.info.status == status
    if status == "FAILED":
        assert run.data.tags["error"] == ("the sweep stopped with exit status 1 (the sweeper's error is in the console "
                                          "output and the sweep's log)")
