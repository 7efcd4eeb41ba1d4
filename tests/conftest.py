import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "fibottention_offsets.json"


@pytest.fixture(scope="session")
def golden_cases():
    """Reference offsets/windows/permutations/densities (copied from shared/golden, computed by the
    authors' reference algorithm)."""
    return json.loads(GOLDEN.read_text())["cases"]


def fibo_run(*overrides: str, root: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``fibo-run`` console script with ``root`` as project root (data, logs, MLflow)."""
    exe = Path(sys.executable).with_name("fibo-run")
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"FIBO_ROOT": str(root), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    return subprocess.run([str(exe), *overrides], cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_fibo():
    return fibo_run


def mlflow_runs(root: Path, experiment: str = "fibo"):
    """All runs of ``experiment`` in the default SQLite store under ``root``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {root / 'mlflow.db'}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)
