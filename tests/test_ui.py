"""The MLflow UI on real fibo runs: ``make ui`` serves the store, its REST API finds the runs, and the
compare-runs page, a run's LoggedModel page and its system-metrics tab render in headless Chromium
(screenshots kept under test-artifacts/).

Needs Debian's ``chromium`` (``.ci/run`` installs it). Without it the browser test fails, unless
``FIBO_SKIP_BROWSER=1`` is set, which skips it explicitly. ``FIBO_CHROMIUM=/path`` picks the binary;
``FIBO_TEST_ARTIFACTS=/dir`` moves the screenshot folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.slow
RUN_NAMES = {f"vit_nano-{att}-digits-s{seed}" for att in ("dense", "fibottention") for seed in (0, 1)}


def _stop(proc: subprocess.Popen) -> None:
    """Ends the process group we started (the command and its children), politely first."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    deadline = time.monotonic() + 10  # children of the leader (same group) finishing their own shutdown
    try:
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _get(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def ui_server(sweep_2x2, tmp_path_factory):
    """``make ui`` (the documented command) on the sweep's store, on a free port; always stopped."""
    logs = tmp_path_factory.mktemp("mlflow_ui")
    port = free_port()
    venv = Path(sys.executable).parent.parent
    cmd = ["make", "-s", "-o", "setup", "ui", f"VENV={venv}", f"UI_STORE=sqlite:///{sweep_2x2 / 'mlflow.db'}",
           f"UI_PORT={port}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with (logs / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"make ui exited with {proc.returncode}:\n{(logs / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MLflow UI not up on {base} after 180 s:\n{(logs / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        _stop(proc)


def _runs_through_rest(base: str) -> tuple[str, list[dict]]:
    exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=fibo")["experiment"]
    found = _get(f"{base}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment_id"]], "filter": "attributes.status = 'FINISHED'",
                  "max_results": 100})
    runs = [r for r in found.get("runs", [])
            if not any(t["key"] == "fibo.comparison" for t in r["data"].get("tags", []))]
    return exp["experiment_id"], runs


def test_rest_api_finds_the_runs(ui_server):
    _, runs = _runs_through_rest(ui_server)
    assert {r["info"]["run_name"] for r in runs} == RUN_NAMES
    for run in runs:
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"test/acc1", "train/throughput", "attention/density"} <= metrics, metrics


def _chromium() -> str:
    exe = os.environ.get("FIBO_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
    if exe:
        return exe
    if os.environ.get("FIBO_SKIP_BROWSER") == "1":
        pytest.skip("FIBO_SKIP_BROWSER=1: the headless-browser check of the MLflow UI is skipped")
    pytest.fail("no chromium found for the MLflow UI test: install Debian's chromium (apt-get install -y chromium, "
                "as .ci/run does), point FIBO_CHROMIUM at a Chromium/Chrome binary, or set FIBO_SKIP_BROWSER=1 to "
                "skip this test on purpose", pytrace=False)


def _headless(exe: str, profile: Path, url: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--window-size=1400,1600", "--virtual-time-budget=30000",
           "--run-all-compositor-stages-before-draw", *args, url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail(f"chromium did not finish within {timeout} s on {url}")
    finally:
        _stop(proc)  # no renderer or GPU helper left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_compare_view_renders_in_headless_chromium(ui_server, tmp_path):
    exe = _chromium()
    exp_id, runs = _runs_through_rest(ui_server)
    ids = [r["info"]["run_id"] for r in runs]
    # the route the UI itself builds for "Compare" (mlflow/server/js: getCompareRunPageRoute)
    url = f"{ui_server}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp_id])}"
    url = urllib.parse.quote(url, safe=":/#?&=,")

    dom = _headless(exe, tmp_path / "profile", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    html = dom.stdout
    (tmp_path / "compare.html").write_text(html)
    assert f"Comparing {len(ids)} Runs from 1 Experiment" in html, html[-3000:]
    for name in RUN_NAMES:  # the runs' names and a metric rendered by the React app, not the static shell
        assert name in html, f"run {name} not on the compare page"
    assert "test/acc1" in html

    shot = tmp_path / "mlflow_compare_runs.png"
    result = _headless(exe, tmp_path / "profile", url, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    artifacts = Path(os.environ.get("FIBO_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, artifacts / shot.name)
    shutil.copy2(tmp_path / "compare.html", artifacts / "mlflow_compare_runs.html")


def test_missing_chromium_fails_unless_skipped_on_purpose(monkeypatch):
    monkeypatch.delenv("FIBO_CHROMIUM", raising=False)
    monkeypatch.delenv("FIBO_SKIP_BROWSER", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"^no chromium found for the MLflow UI test: install Debian's"):
        _chromium()
    monkeypatch.setenv("FIBO_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="FIBO_SKIP_BROWSER=1"):
        _chromium()


def _keep(shot: Path, html: str, name: str) -> None:
    artifacts = Path(os.environ.get("FIBO_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, artifacts / f"{name}.png")
    (artifacts / f"{name}.html").write_text(html)


def _render(exe: str, tmp_path: Path, url: str, name: str) -> str:
    url = urllib.parse.quote(url, safe=":/#?&=,")
    dom = _headless(exe, tmp_path / "profile", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    shot = tmp_path / f"{name}.png"
    result = _headless(exe, tmp_path / "profile", url, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    _keep(shot, dom.stdout, name)
    return dom.stdout


def test_model_and_system_metrics_pages_render_in_headless_chromium(ui_server, tmp_path):
    """A run's LoggedModel page (MLflow 3: #/experiments/<id>/models/<model id>) and its system-metrics
    tab (#/experiments/<id>/runs/<run id>/system-metrics), screenshots kept in test-artifacts/."""
    exp_id, runs = _runs_through_rest(ui_server)
    run = next(r for r in runs if r["info"]["run_name"] == "vit_nano-fibottention-digits-s0")
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    model_id = tags["fibo.model_id"]
    model = _get(f"{ui_server}/api/2.0/mlflow/logged-models/{model_id}")["model"]
    assert model["info"]["source_run_id"] == run["info"]["run_id"] and model["info"]["name"] == "model"
    system = {m["key"] for m in run["data"]["metrics"] if m["key"].startswith("system/")}
    assert "system/cpu_utilization_percentage" in system, system
    exe = _chromium()
    html = _render(exe, tmp_path, f"{ui_server}/#/experiments/{exp_id}/models/{model_id}", "mlflow_logged_model")
    assert model_id in html and "vit_nano-fibottention-digits-s0" in html, html[-3000:]
    html = _render(exe, tmp_path, f"{ui_server}/#/experiments/{exp_id}/runs/{run['info']['run_id']}/system-metrics",
                   "mlflow_system_metrics")
    assert "cpu_utilization_percentage" in html, html[-3000:]
