import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs pytest -n 2 (pytest-xdist): one OpenMP thread per worker (and per process its
    # tests start), so the two workers share two cores instead of oversubscribing them; before torch
    # is imported, which reads it once.
    os.environ["OMP_NUM_THREADS"] = os.environ.get("FIBO_TEST_THREADS", "1")
    for _name in ("COLUMNS", "LINES"):  # xdist workers get 80x24, which narrows rich's tables (fibo-compare)
        os.environ.pop(_name, None)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "fibottention_offsets.json"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") and "torch" in sys.modules:  # imported before this file
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored():
    """Each test starts with the process's MLflow tracking URI as the session had it: Lightning's
    MLFlowLogger(tracking_uri=...) calls mlflow.set_tracking_uri, which also sets
    $MLFLOW_TRACKING_URI for the whole process, so one test's store became every later in-process
    run's default store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)  # None: unset (the env var too)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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
    return subprocess.run([str(exe), *overrides], cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when pytest dies, so a killed test session leaves no training behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except OSError:
        pass


@pytest.fixture
def run_fibo():
    return fibo_run


def mlflow_runs(root: Path, experiment: str = "fibo", jobs_only: bool = True):
    """The runs of ``experiment`` in the default SQLite store under ``root``: the training/eval jobs only
    (``jobs_only``: sweep parents and fibo-compare runs, tagged ``fibo.comparison=true``, left out), or all."""
    from mlflow.tracking import MlflowClient

    from fibo.compare import COMPARISON_TAG

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {root / 'mlflow.db'}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if not jobs_only or r.data.tags.get(COMPARISON_TAG) != "true"]


@pytest.fixture(scope="session")
def sweep_2x2(tmp_path_factory) -> Path:
    """Project root holding 4 real, short ``fibo-run`` runs in experiment ``fibo`` (attention dense and
    fibottention x seeds 0 and 1; ``debug=short``: 2 epochs of 5 batches), shared by the comparison and
    MLflow UI tests. Tests add only comparison runs to it (tagged ``fibo.comparison``)."""
    root = tmp_path_factory.mktemp("sweep_2x2")
    result = fibo_run("-m", "debug=short", "experiment_name=fibo", "attention=dense,fibottention", "seed=0,1",
                      root=root, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lifecycle_cfg(tmp_path, *overrides, debug="fast_dev_run"):
    """The composed config of an in-process run (``debug=<debug>`` + ``overrides``, root ``tmp_path``),
    as @hydra.main hands it to ``fibo.cli.train``: without the hydra node (HydraConfig stays set)."""
    from omegaconf import open_dict
    from test_config import compose_cfg

    cfg = compose_cfg(tmp_path, [f"debug={debug}", *overrides])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
