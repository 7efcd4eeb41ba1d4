"""docker/Dockerfile and docker/compose.yaml, checked without a Docker engine: the files parse, the
image installs what the package declares and runs its console script, the compose services fit
together; and the MLflow server command of the compose file really serves the trainer."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port

DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, args = buf.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            buf = ""
    assert not buf, f"unterminated continuation: {buf!r}"
    return out


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions(DOCKERFILE)


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def _args(instructions, word):
    return [a for w, a in instructions if w == word]


def test_dockerfile_parses_into_known_instructions(instructions):
    known = {"FROM", "ARG", "RUN", "ENV", "WORKDIR", "COPY", "VOLUME", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE", "USER"}
    assert {w for w, _ in instructions} <= known, instructions
    assert instructions[0][0] in ("FROM", "ARG")


def test_base_image_is_an_official_pytorch_cuda_runtime_pinned_by_tag(instructions):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in _args(instructions, "ARG") if "=" in a}
    (base,) = _args(instructions, "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    repo, _, tag = base.partition(":")
    assert repo == "pytorch/pytorch", base
    assert re.fullmatch(r"2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), f"not pinned to a release tag: {base}"


def test_image_installs_the_declared_extras_and_keeps_the_images_torch(instructions, pyproject):
    installs = [a for a in _args(instructions, "RUN") if "pip install" in a]
    assert installs, "no pip install in the Dockerfile"
    extras = set()
    for cmd in installs:
        for match in re.finditer(r"\.\[([\w,-]+)\]", cmd):
            extras |= set(match.group(1).split(","))
        assert "torch==" not in cmd.replace("torch=={", ""), "the image must not reinstall torch"
        assert "-c /opt/torch-constraints.txt" in cmd, "pip must keep the base image's torch/torchvision"
    assert {"video", "robot"} <= extras, extras  # all three tasks' dependencies (image needs none extra)
    assert extras <= set(pyproject["optional-dependencies"]), f"unknown extras {extras - set(pyproject['optional-dependencies'])}"
    # the editable install keeps conf/ beside the package (fibo.cli finds it there): both are copied
    copies = " ".join(_args(instructions, "COPY"))
    for path in ("pyproject.toml", "fibo", "conf"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copies), f"{path} is not copied into the image"


def test_entrypoint_is_the_fibo_run_console_script(instructions, pyproject):
    (entry,) = _args(instructions, "ENTRYPOINT")
    assert json.loads(entry) == ["fibo-run"]  # exec form, so `docker run fibo <overrides>` passes them on
    assert pyproject["scripts"]["fibo-run"] == "fibo.cli:main"


def test_image_environment_points_runs_data_and_rendering(instructions):
    env = " ".join(_args(instructions, "ENV"))
    for item in ("FIBO_ROOT=/runs", "FIBO_DATA_DIR=/data", "MUJOCO_GL=egl"):
        assert item in env, env
    apt = " ".join(a for a in _args(instructions, "RUN") if "apt-get install" in a)
    for pkg in ("libegl1", "libgl1", "libosmesa6", "build-essential"):
        assert pkg in apt.split(), pkg


def test_dockerignore_keeps_local_state_out():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") + 1:] and "*" in lines  # everything out, then only what the image needs
    assert {"!fibo", "!conf", "!pyproject.toml"} <= set(lines)


def test_compose_train_service_uses_gpus_and_the_mlflow_server(compose):
    services = compose["services"]
    assert set(services) >= {"train", "mlflow"}
    train, mlflow = services["train"], services["mlflow"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / train["build"]["context"] / train["build"]["dockerfile"]).resolve() == DOCKERFILE
    uri = train["environment"]["MLFLOW_TRACKING_URI"]
    port = next(a.split("=")[1] for a in mlflow["command"] if a.startswith("--port"))
    assert uri == f"http://mlflow:{port}", uri  # the service name is the host name on compose's network
    assert "mlflow" in train["depends_on"]
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy" and "healthcheck" in mlflow
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all" and "gpu" in device["capabilities"]
    assert train["ipc"] == "host"
    targets = {v.rsplit(":", 1)[1] for v in train["volumes"]}
    assert {"/data", "/runs"} <= targets


def test_compose_mlflow_server_persists_runs_and_serves_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow", "server"]
    args = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True) for a in mlflow["command"])
    assert args["host"] == "0.0.0.0" and args["serve-artifacts"] is True
    mounts = {v.split(":")[1]: v.split(":")[0] for v in mlflow["volumes"]}
    store = args["backend-store-uri"].removeprefix("sqlite:///")
    assert any(store.startswith(m) for m in mounts), "the backend store is not on a volume"
    assert any(args["artifacts-destination"].startswith(m) for m in mounts), "the artifact root is not on a volume"
    named = {src for src in mounts.values() if not src.startswith((".", "/", "$"))}
    assert named <= set(compose.get("volumes") or {}), "named volumes must be declared"


@pytest.mark.slow
def test_compose_mlflow_command_serves_a_trainer_called_mlflow(tmp_path, compose):
    """Runs the compose file's `mlflow server` command here (paths moved under tmp_path): requests
    addressed to host `mlflow` are accepted, a run's artifact upload goes through the server into
    the artifact volume."""
    mlflow = compose["services"]["mlflow"]
    port = free_port()
    args = [a.replace("/mlflow/", f"{tmp_path}/").replace("0.0.0.0", "127.0.0.1").replace("--port=5000", f"--port={port}")
            for a in mlflow["command"]]
    args = [a for a in args if not a.startswith("--workers")] + ["--workers=1"]
    exe = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(exe), "server", *args], stdout=(tmp_path / "server.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)  # its workers in one group
    try:
        def get(path, host):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        deadline = time.time() + 120
        while True:
            try:
                if get("/health", "localhost") == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        assert get("/api/2.0/mlflow/experiments/search?max_results=1", "mlflow:5000") == 200
        assert get("/api/2.0/mlflow/experiments/search?max_results=1", "attacker.example") >= 400  # the allow-list is live

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("compose-check"))
        (tmp_path / "ckpt.txt").write_text("weights")
        client.log_artifact(run.info.run_id, str(tmp_path / "ckpt.txt"), "last")
        assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        stored = list((tmp_path / "artifacts").rglob("ckpt.txt"))
        assert stored and stored[0].read_text() == "weights"
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
