"""The real ``fibo-run`` command: training on real data, MLflow records, failures, resume, sweeps."""

import re

import pytest

from conftest import lifecycle_cfg as _lifecycle_cfg, mlflow_runs

pytestmark = pytest.mark.slow


def _result(stdout: str) -> float:
    match = re.search(r"fibo: test/acc1 = ([0-9.]+)", stdout)
    assert match, stdout[-3000:]
    return float(match.group(1))


def test_train_digits_end_to_end(tmp_path, run_fibo):
    result = run_fibo("trainer.max_epochs=12", "task.warmup_epochs=1", root=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    acc = _result(result.stdout)
    assert acc >= 0.70, f"test accuracy {acc} on digits after 12 epochs (chance is 0.10)"
    assert f"browse: mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in result.stdout

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test/acc1"] == pytest.approx(acc, abs=1e-4)
    for key in ("train/loss", "val/acc1", "val/acc5", "test/acc5", "train/throughput", "attention/density_patch"):
        assert key in metrics, sorted(metrics)
    assert 0.0 < metrics["attention/density_patch"] < 0.3  # Fibottention at N=64, H=3
    assert len(client.get_metric_history(run.info.run_id, "val/acc1")) == 12
    params = run.data.params
    assert params["attention/name"] == "fibottention" and params["model/name"] == "vit_nano"
    assert params["data/_target_"] == "fibo.data.images.DigitsDataModule"
    assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["mlflow.source.git.commit"])
    assert run.data.tags["choice.attention"] == "fibottention"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config" in artifacts and "last" in artifacts, artifacts
    config_files = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/config.yaml" in config_files
    ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "last")]
    assert "last/last.ckpt" in ckpts, f"final checkpoint not logged: {ckpts}"


def test_crash_marks_run_failed(tmp_path, run_fibo):
    result = run_fibo("data=imagefolder", f"data.root={tmp_path / 'nowhere'}", root=tmp_path, timeout=300)
    assert result.returncode == 1
    assert f"image folder {tmp_path / 'nowhere' / 'train'} not found" in result.stderr
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith("FileNotFoundError: image folder")


def test_unresolvable_config_marks_run_failed(tmp_path, run_fibo):
    result = run_fibo("task=video", "data=videofolder", root=tmp_path, timeout=300)  # no data.root / num_classes
    assert result.returncode == 1
    assert "Missing mandatory value: data.num_classes" in result.stderr
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING


def test_resume_continues_the_same_run(tmp_path, run_fibo):
    first = run_fibo("debug=short", root=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    client, runs = mlflow_runs(tmp_path, "fibo-debug")
    run_id = runs[0].info.run_id
    last = tmp_path / "logs" / "runs"
    ckpt = next(last.glob("*/checkpoints/last.ckpt"))
    # another attention choice than the run's: refused before the finished run is touched
    wrong = run_fibo("debug=short", "attention=dense", f"ckpt_path={ckpt}", root=tmp_path, timeout=300)
    assert wrong.returncode == 1
    assert (f"ckpt_path={ckpt} belongs to MLflow run {run_id}, started with task=image data=digits model=vit_nano "
            f"attention=fibottention; this command has attention=dense (was fibottention)") in wrong.stderr
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [(r.info.status, r.data.tags["choice.attention"]) for r in runs] == [("FINISHED", "fibottention")]
    # another image size: the checkpoint's weights do not fit; refused before the run is touched (before:
    # a raw "size mismatch" from load_state_dict, and the FINISHED run turned FAILED)
    resized = run_fibo("debug=short", "data.img_size=32", f"ckpt_path={ckpt}", root=tmp_path, timeout=300)
    assert resized.returncode == 1
    assert (f"ckpt_path={ckpt} does not fit the model as configured: pos_embed is [1, 65, 96] in the checkpoint but "
            f"[1, 257, 96] now (options changed since the run: data.img_size: 16 -> 32; model.img_size: 16 -> 32)"
            ) in resized.stderr
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [(r.info.status, "failed_attempt" in r.data.tags) for r in runs] == [("FINISHED", False)]
    second = run_fibo("debug=short", "trainer.max_epochs=3", f"ckpt_path={ckpt}", root=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    epochs = [m.step for m in client.get_metric_history(run_id, "val/acc1")]
    # 2 epochs before, 1 after resuming (Lightning re-validates the restored epoch at the same step)
    assert len(set(epochs)) == 3 and max(epochs) > max(epochs[:2])


def test_missing_checkpoint_is_a_clear_error(tmp_path, run_fibo):
    result = run_fibo(f"ckpt_path={tmp_path / 'nope.ckpt'}", root=tmp_path, timeout=120)
    assert result.returncode == 1
    assert f"ckpt_path={tmp_path / 'nope.ckpt'} does not exist" in result.stderr


def test_checkpoint_that_is_not_one_is_a_clear_error(tmp_path, run_fibo):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    result = run_fibo(f"ckpt_path={bogus}", root=tmp_path, timeout=120)
    assert result.returncode == 1
    assert f"ckpt_path={bogus} is not a Lightning checkpoint that torch.load can read" in result.stderr


def test_multirun_sweep_logs_one_run_per_job(tmp_path, run_fibo):
    result = run_fibo("-m", "attention=dense,fibottention", "seed=0,1", "debug=fast_dev_run", root=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    combos = sorted((r.data.tags["choice.attention"], r.data.tags["seed"]) for r in runs)
    assert combos == [("dense", "0"), ("dense", "1"), ("fibottention", "0"), ("fibottention", "1")]
    dens = {r.data.tags["choice.attention"]: r.data.metrics["attention/density"] for r in runs}
    assert dens["dense"] == 1.0 and dens["fibottention"] < 0.3


def test_video_fast_dev_run_through_fibo_run(tmp_path, run_fibo):
    """The headline command on the embedded videos (written on first use), one batch of each stage."""
    result = run_fibo("task=video", "model=timesformer_fibo", "debug=fast_dev_run", "data.cache_frames=false",
                      root=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "data" / "moving_digits").rglob("*.mp4"))) == 672
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["choice.model"] == "timesformer_fibo" and run.data.params["attention/name"] == "fibottention"
    metrics = run.data.metrics
    assert metrics["data/train_videos"] == 480 and metrics["data/skipped_videos"] == 0
    assert re.search(r"fibo: test/acc1 = [0-9.]+", result.stdout)  # fast_dev_run: Lightning logs no metrics
    assert 0 < metrics["attention/density_patch"] < 0.2


def test_sigterm_marks_run_killed_and_keeps_checkpoints(tmp_path):
    """A job killed by its scheduler (SIGTERM): exit status 143, run KILLED, last.ckpt kept."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"FIBO_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    exe = Path(sys.executable).with_name("fibo-run")
    out, err_file = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")  # no pipe to fill up
    proc = subprocess.Popen([str(exe), "trainer.max_epochs=50", "attention=dense"], cwd=tmp_path, env=env,
                            stdout=out, stderr=err_file, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("logs/runs/*/checkpoints/last.ckpt")):
        time.sleep(1)
    assert list(tmp_path.glob("logs/runs/*/checkpoints/last.ckpt")), "no checkpoint after 300 s"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "is marked KILLED in MLflow; resume it with: fibo-run <same overrides> ckpt_path=" in err
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert list(tmp_path.glob("logs/runs/*/checkpoints/last.ckpt"))


# ---------------------------------------------------------------- the lifecycle, in-process


def test_failed_resume_attempt_leaves_a_finished_run_finished(tmp_path):
    """A later attempt on a FINISHED run that fails must not turn it FAILED (before: it did)."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    from fibo.tracking import RUN_ID_KEY, run_lifecycle

    cfg = _lifecycle_cfg(tmp_path)
    choices = dict(HydraConfig.get().runtime.choices)
    with run_lifecycle(cfg, choices, tmp_path / "out") as run:
        run_id = run.run_id
    client, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["choice.task"] == "image"
    ckpt = tmp_path / "last.ckpt"
    torch.save({RUN_ID_KEY: run_id, "state_dict": {}, "pytorch-lightning_version": "2.6.6"}, ckpt)
    cfg = _lifecycle_cfg(tmp_path, f"ckpt_path={ckpt}")
    with pytest.raises(RuntimeError, match="boom"), run_lifecycle(cfg, choices, tmp_path / "out") as run:
        assert run.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
        raise RuntimeError("boom")
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and "error" not in after.data.tags
    assert after.data.tags["failed_attempt"] == "RuntimeError: boom"


def test_lifecycle_failed_killed_and_data_report(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from fibo.data.report import DataReport
    from fibo.tracking import run_lifecycle

    class Reporting:
        def report(self):
            return DataReport(metrics={"data/things": 3}, texts={"data/left_out.tsv": "a\tmissing\n"})

    cfg = _lifecycle_cfg(tmp_path)
    choices = dict(HydraConfig.get().runtime.choices)
    with pytest.raises(ValueError), run_lifecycle(cfg, choices, tmp_path / "out") as run:
        run.datamodule = Reporting()
        raise ValueError("bad")
    failed = run.run_id
    assert run.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}", run.tracking_uri
    with pytest.raises(SystemExit) as stopped, run_lifecycle(cfg, choices, tmp_path / "out") as run:
        raise SystemExit()  # Lightning's SIGTERMException: no code
    assert stopped.value.code == 143
    client, _ = mlflow_runs(tmp_path, "fibo-debug")
    record = client.get_run(failed)
    assert record.info.status == "FAILED" and record.data.tags["error"] == "ValueError: bad"
    assert record.data.metrics["data/things"] == 3
    assert [a.path for a in client.list_artifacts(failed, "data")] == ["data/left_out.tsv"]
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_sigterm_outside_training_ends_the_run_killed(tmp_path):
    """Before: SIGTERM while building (e.g. generating robot demos, before Lightning's fit installs its
    handler) killed the process at once and left the MLflow run RUNNING for good."""
    import os
    import signal

    from hydra.core.hydra_config import HydraConfig

    from fibo.tracking import run_lifecycle

    cfg = _lifecycle_cfg(tmp_path)
    choices = dict(HydraConfig.get().runtime.choices)
    with pytest.raises(SystemExit) as stopped, run_lifecycle(cfg, choices, tmp_path / "out") as run:
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right after this call
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the process's handler as found
    client, _ = mlflow_runs(tmp_path, "fibo-debug")
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_fit_result_is_looked_up_under_the_fit_name():
    """The fit-time headline is ``result_metric.fit`` (before: the test name was looked up when
    test=true); a callback's ``results`` (the rollouts) is read without touching callback_metrics."""
    from types import SimpleNamespace

    from fibo.cli import fit_result

    rollouts = SimpleNamespace(results=[{"rollout/success_rate": 0.2}, {"rollout/success_rate": 0.6}])
    trainer = SimpleNamespace(callbacks=[object(), rollouts], callback_metrics={"val/acc1": 0.5})
    assert fit_result(trainer, "rollout/success_rate") == 0.6
    assert fit_result(trainer, "val/acc1") == 0.5
    assert fit_result(trainer, "test/acc1") is None


def test_runs_log_mlflow_system_metrics(tmp_path):
    """Every run samples MLflow's system metrics (psutil) every ``logger.system_metrics_interval`` s,
    plus one last sample at the end; 0 turns them off."""
    import time

    from hydra.core.hydra_config import HydraConfig

    from fibo.tracking import run_lifecycle

    choices = dict(HydraConfig.get().runtime.choices)
    with run_lifecycle(_lifecycle_cfg(tmp_path, "logger.system_metrics_interval=0.5"), choices, tmp_path / "o") as run:
        time.sleep(1.8)
    sampled = run.run_id
    with run_lifecycle(_lifecycle_cfg(tmp_path, "logger.system_metrics_interval=0"), choices, tmp_path / "o") as run:
        pass
    client, _ = mlflow_runs(tmp_path, "fibo-debug")
    metrics = client.get_run(sampled).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in metrics, sorted(metrics)
    history = client.get_metric_history(sampled, "system/system_memory_usage_megabytes")
    assert len(history) >= 3 and all(m.value > 0 for m in history), history  # 3 samples in 1.8 s + the last
    assert sorted(m.step for m in history) == list(range(len(history)))
    assert not [k for k in client.get_run(run.run_id).data.metrics if k.startswith("system/")]
