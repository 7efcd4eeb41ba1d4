"""Where a run's MLflow store is: a relative ``sqlite:///`` URI means the launch directory, whatever
the working directory is when the run starts (``hydra.job.chdir=true`` moves it into the run folder)."""

from pathlib import Path

import pytest

from conftest import lifecycle_cfg


@pytest.mark.parametrize("uri,expected", [
    ("sqlite:///rel.db", "sqlite:////launch/rel.db"),
    ("sqlite:///stores/m.db?timeout=30", "sqlite:////launch/stores/m.db?timeout=30"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_absolute_sqlite_uri(uri, expected):
    from fibo.store import absolute_sqlite_uri

    assert absolute_sqlite_uri(uri, Path("/launch")) == expected


def test_relative_store_resolves_against_the_launch_directory_with_chdir(tmp_path, monkeypatch):
    """#11: MLFLOW_TRACKING_URI=sqlite:///rel.db with hydra.job.chdir=true made a store in every run
    folder; it is <launch dir>/rel.db (Hydra's runtime.cwd)."""
    from hydra.core.hydra_config import HydraConfig
    from mlflow.tracking import MlflowClient

    from fibo.tracking import run_lifecycle

    cfg = lifecycle_cfg(tmp_path, "logger.system_metrics_interval=0")  # HydraConfig: runtime.cwd = tmp_path
    run_dir = tmp_path / "logs" / "runs" / "job0"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(run_dir)  # what hydra.job.chdir=true does before the job starts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    with run_lifecycle(cfg, dict(HydraConfig.get().runtime.choices), run_dir) as run:
        pass
    assert run.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"
    assert (tmp_path / "rel.db").is_file() and not (run_dir / "rel.db").exists()
    record = MlflowClient(tracking_uri=run.tracking_uri).get_run(run.run_id)
    assert record.info.status == "FINISHED" and record.data.tags["output_dir"] == str(run_dir)
