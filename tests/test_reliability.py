"""Issue #11: concurrent runs, unreachable servers, failed resumes, divergence and bad overrides.

Each test failed before its fix. The concurrency tests start real processes on one store."""

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, lifecycle_cfg as _lifecycle_cfg, mlflow_runs


def _env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FIBO_ROOT")}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    if root is not None:
        env["FIBO_ROOT"] = str(root)
    return env


def _fibo_run(*args, cwd: Path, env: dict) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("fibo-run")
    return subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# ---------------------------------------------------------------- 1 + 2: two runs at once on a new store


@pytest.mark.slow
def test_two_runs_started_together_on_a_new_store_both_finish_in_their_own_folders(tmp_path):
    """Before: both crashed in MLflow's schema migration (leaving _alembic_tmp_* tables), and two
    runs started in the same second shared logs/runs/<time>/."""
    procs = [_fibo_run("debug=fast_dev_run", f"seed={s}", cwd=tmp_path, env=_env(tmp_path)) for s in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert not {t for t in _tables(tmp_path / "mlflow.db") if t.startswith("_alembic_tmp_")}
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    dirs = sorted(r.data.tags["output_dir"] for r in runs)
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", Path(d).name), d
        assert (Path(d) / ".hydra" / "config.yaml").is_file()


def test_run_folder_suffix_is_fixed_per_process_and_differs_between_processes():
    from fibo.launch import RUN_SUFFIX

    code = "from fibo.launch import RUN_SUFFIX; print(RUN_SUFFIX)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{6}", RUN_SUFFIX) and re.fullmatch(r"[0-9a-f]{6}", other)
    assert other != RUN_SUFFIX
    from omegaconf import OmegaConf

    assert OmegaConf.create({"a": "${fibo.run_suffix:}"}).a == RUN_SUFFIX


@pytest.mark.slow
def test_processes_preparing_a_new_store_at_once_all_succeed(tmp_path):
    """Plain MLflow clients racing on a new SQLite file crash in alembic; prepare_store serialises them."""
    db = tmp_path / "new.db"
    code = ("import sys; from fibo.tracking import prepare_store; from mlflow.tracking import MlflowClient; "
            f"uri = 'sqlite:///{db}'; prepare_store(uri); print(MlflowClient(uri).create_run('0').info.run_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert not {t for t in _tables(db) if t.startswith("_alembic_tmp_")}
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(f"sqlite:///{db}").search_runs(["0"])) == 3


def _store_with_a_run(db: Path) -> str:
    from mlflow.tracking import MlflowClient

    from fibo.tracking import prepare_store

    prepare_store(f"sqlite:///{db}")
    client = MlflowClient(f"sqlite:///{db}")
    run = client.create_run("0")
    client.log_param(run.info.run_id, "kept", "yes")
    return run.info.run_id


def test_half_migrated_store_is_repaired_and_keeps_its_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from fibo.tracking import prepare_store

    db = tmp_path / "m.db"
    run_id = _store_with_a_run(db)
    with sqlite3.connect(db) as con:  # what an interrupted batch migration of `params` leaves
        con.execute("CREATE TABLE _alembic_tmp_params (key VARCHAR(250), value VARCHAR(8000))")
    prepare_store(f"sqlite:///{db}")
    assert "_alembic_tmp_params" not in _tables(db)
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).data.params == {"kept": "yes"}


def test_half_migrated_new_store_is_recreated(tmp_path):
    from mlflow.tracking import MlflowClient

    from fibo.tracking import prepare_store

    db = tmp_path / "m.db"
    prepare_store(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_x (id INTEGER)")
    prepare_store(f"sqlite:///{db}")
    assert "_alembic_tmp_x" not in _tables(db)
    assert MlflowClient(f"sqlite:///{db}").search_experiments()[0].name == "Default"


def test_half_migrated_store_whose_table_is_gone_names_the_fix(tmp_path):
    from fibo.tracking import TrackingError, prepare_store

    db = tmp_path / "m.db"
    _store_with_a_run(db)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_x (id INTEGER)")
    with pytest.raises(TrackingError) as err:
        prepare_store(f"sqlite:///{db}")
    assert str(err.value) == (
        f"MLflow store {db} was left half-migrated: table _alembic_tmp_x holds what should be table x, which is gone. "
        f"Back up {db}, then: sqlite3 {db} 'ALTER TABLE _alembic_tmp_x RENAME TO x' && mlflow db upgrade sqlite:///{db}")


# ---------------------------------------------------------------- 3: unreachable server


def test_unreachable_tracking_server_fails_fast_naming_the_uri():
    from fibo.tracking import TrackingError, check_tracking_server

    start = time.perf_counter()
    with pytest.raises(TrackingError) as err:
        check_tracking_server("http://127.0.0.1:1", timeout_s=5)
    assert time.perf_counter() - start < 20
    assert str(err.value).startswith(
        "MLflow tracking server http://127.0.0.1:1 is unreachable ([Errno 111] Connection refused, probed "
        "http://127.0.0.1:1/health for 5 s): start it (mlflow server --backend-store-uri sqlite:///mlflow.db "
        "--host <host> --port <port>) or set MLFLOW_TRACKING_URI / logger.tracking_uri to a server that runs")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT" in str(err.value)
    check_tracking_server("sqlite:///nowhere.db")  # not a server: not probed


def test_fibo_run_with_an_unreachable_server_stops_with_one_line(tmp_path):
    """Before: fibo-run hung (MLflow retries for minutes). The probe runs before Lightning is imported."""
    start = time.perf_counter()
    proc = _fibo_run("debug=fast_dev_run", cwd=tmp_path, env=_env(tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:1"))
    _, err = proc.communicate(timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    assert "fibo-run: error: MLflow tracking server http://127.0.0.1:1 is unreachable" in err and "Traceback" not in err
    assert elapsed < 20, elapsed  # 6.6 s measured on the busy 2-core machine (Hydra's start-up)


# ---------------------------------------------------------------- 4: incompatible resume


def test_incompatible_resume_is_refused_before_the_run_is_touched(tmp_path):
    """Before: a raw 'size mismatch' from load_state_dict, and the FINISHED run turned FAILED."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from fibo.tracking import RUN_ID_KEY, run_lifecycle

    cfg = _lifecycle_cfg(tmp_path)
    choices = dict(HydraConfig.get().runtime.choices)
    with run_lifecycle(cfg, choices, tmp_path / "out") as run:
        run_id = run.run_id
    state = {f"model.{k}": v for k, v in instantiate(cfg.model).state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({RUN_ID_KEY: run_id, "state_dict": state, "pytorch-lightning_version": "2.6.6"}, ckpt)
    cfg = _lifecycle_cfg(tmp_path, "data.img_size=32", f"ckpt_path={ckpt}")
    with pytest.raises(ValueError) as err, run_lifecycle(cfg, choices, tmp_path / "out"):
        pass
    assert str(err.value) == (
        f"ckpt_path={ckpt} does not fit the model as configured: pos_embed is [1, 65, 96] in the checkpoint but "
        f"[1, 257, 96] now (options changed since the run: data.img_size: 16 -> 32; model.img_size: 16 -> 32); "
        f"resume with the run's options, or start a new run without ckpt_path")
    client, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [(r.info.status, "failed_attempt" in r.data.tags) for r in runs] == [("FINISHED", False)]

    foreign = tmp_path / "foreign.ckpt"  # no MLflow run: the likely options are named, no run is created
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6"}, foreign)
    cfg = _lifecycle_cfg(tmp_path, "data.img_size=32", f"ckpt_path={foreign}")
    with pytest.raises(ValueError, match=r"pos_embed is \[1, 65, 96\] in the checkpoint but \[1, 257, 96\] now "
                                         r"\(likely changed: an option that sets the model's sizes \(data.img_size"):
        with run_lifecycle(cfg, choices, tmp_path / "out"):
            pass
    assert len(mlflow_runs(tmp_path, "fibo-debug")[1]) == 1


# ---------------------------------------------------------------- 5: divergence


from fibo.tasks.image import ImageClassifier  # noqa: E402


class NaNFromStep(ImageClassifier):
    """The image task whose loss turns NaN from optimizer step ``nan_from_step`` on (for the test)."""

    def __init__(self, *args, nan_from_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_from_step = nan_from_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_from_step else loss


def test_divergence_stops_the_run_failed_and_keeps_earlier_checkpoints(tmp_path):
    """Before: NaN losses trained on and the run ended FINISHED with an accuracy."""
    from fibo.cli import train
    from fibo.tasks.base import DivergedError

    cfg = _lifecycle_cfg(tmp_path, "task._target_=test_reliability.NaNFromStep", "+task.nan_from_step=7", debug="short")
    with pytest.raises(DivergedError) as err:
        train(cfg)
    assert str(err.value) == ("training diverged: the loss is nan at step 7 (epoch 1), the run stops before this "
                              "step's update; lower task.lr (now 0.001) or check the data for NaN/inf values")
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error"] == f"DivergedError: {err.value}"
    assert [p.name for p in (tmp_path / "out" / "checkpoints").glob("*.ckpt")], "epoch 0's checkpoints are gone"
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


def test_a_huge_lr_diverges_and_ends_failed_not_finished(tmp_path):
    """`fibo-run task.lr=1e6 debug=short` trained on NaN and ended FINISHED with an accuracy."""
    from fibo.cli import train
    from fibo.tasks.base import DivergedError

    with pytest.raises(DivergedError, match=r"^training diverged: the loss is (nan|inf) at step \d+ \(epoch 0\)"):
        train(_lifecycle_cfg(tmp_path, "task.lr=1e6", debug="short"))
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["error"].startswith("DivergedError: training diverged")
    assert "test/acc1" not in runs[0].data.metrics


# ---------------------------------------------------------------- 7: hydra.job.chdir=true


def test_command_line_paths_resolve_against_the_launch_directory(tmp_path):
    from omegaconf import OmegaConf

    from fibo.launch import absolute_cli_paths

    cfg = OmegaConf.create({"data": {"root": "imgs", "train_list": "a/train.txt", "img_size": 16, "name": "x",
                                     "val_list": "~/v.txt"},
                            "ckpt_path": "runs/last.ckpt", "paths": {"root_dir": "/abs"}})
    overrides = ["data.root=imgs", "data.train_list=a/train.txt", "data.name=x", "ckpt_path=runs/last.ckpt",
                 "paths.root_dir=/abs", "data=imagefolder", "data.val_list='~/v.txt'"]
    absolute_cli_paths(cfg, overrides, str(tmp_path))
    assert cfg.data.root == str(tmp_path / "imgs") and cfg.data.train_list == str(tmp_path / "a" / "train.txt")
    assert cfg.ckpt_path == str(tmp_path / "runs" / "last.ckpt")
    assert cfg.data.name == "x" and cfg.paths.root_dir == "/abs" and cfg.data.val_list == "~/v.txt"  # ~ is absolute


def _image_folder(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")


@pytest.mark.slow
def test_chdir_true_keeps_relative_data_paths_and_the_default_store(tmp_path):
    """Before: '<run dir>/imgs/train not found', and the MLflow store moved into each run's folder."""
    _image_folder(tmp_path / "imgs")
    proc = _fibo_run("hydra.job.chdir=true", "debug=fast_dev_run", "data=imagefolder", "data.root=imgs",
                     "data.num_classes=2", "data.img_size=16", "data.batch_size=4",
                     "data.num_workers=0", cwd=tmp_path, env=_env(None))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"tracking URI: sqlite:///{tmp_path / 'mlflow.db'}" in out
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["data/root"] == str(tmp_path / "imgs")
    assert not list((tmp_path / "logs").rglob("mlflow.db"))


# ---------------------------------------------------------------- 8: dot-override of a config group


def test_dot_override_of_a_config_group_names_the_group_choice():
    from fibo.launch import check_overrides

    with pytest.raises(ValueError) as err:
        check_overrides(["seed=1", "model.attention=dense"])
    assert str(err.value) == ("model.attention=dense sets model.attention to the string 'dense', but attention is a "
                              "config group: choose it with attention=dense (no dot)")
    with pytest.raises(ValueError) as err:
        check_overrides(["model.data=nope"])
    assert str(err.value).startswith("model.data=nope sets model.data to the string 'nope', but data is a config "
                                     "group: choose it with data=<cifar10|cifar100|digits|")
    check_overrides(["attention=dense", "model.drop_path_rate=0.1", "callbacks.rollout=null", "data.img_size=32",
                     "model.attention=${attention}"])


# ---------------------------------------------------------------- weak spots: one line for bad input


def test_checkpoint_paths_that_are_not_checkpoints_are_named(tmp_path):
    import torch

    from fibo.tracking import load_checkpoint

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError) as err:
        load_checkpoint(str(tmp_path / "run"))
    assert str(err.value) == f"ckpt_path={tmp_path / 'run'} is a directory: pass the .ckpt file (it holds checkpoints/last.ckpt)"
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, weights)  # a torch file, not a Lightning checkpoint
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(weights))
    assert str(err.value) == (f"ckpt_path={weights} holds a dict with keys ['weight'], not a Lightning checkpoint "
                              f"(state_dict, pytorch-lightning_version); pass a .ckpt written by fibo-run")


def test_bad_seed_experiment_name_and_recipe_are_one_line(tmp_path):
    from omegaconf import OmegaConf
    from torch import nn

    from fibo.launch import check_run_options
    from fibo.tasks.base import BaseTask

    for cfg, message in (({"seed": "abc", "experiment_name": "x"}, "seed='abc' is not an integer: pass seed=<int>, e.g. seed=0"),
                         ({"seed": 0, "experiment_name": ""}, "experiment_name='' is empty: pass an MLflow experiment "
                                                              "name, e.g. experiment_name=fibo")):
        with pytest.raises(ValueError) as err:
            check_run_options(OmegaConf.create(cfg))
        assert str(err.value) == message
    for kwargs, message in (({"lr": -1}, "task.lr=-1 must be > 0 (e.g. task.lr=1e-3)"),
                            ({"batch_size": 0}, "data.batch_size=0 must be >= 1"),
                            ({"weight_decay": -0.1}, "task.weight_decay=-0.1 must be >= 0")):
        with pytest.raises(ValueError) as err:
            BaseTask(nn.Linear(2, 2), **kwargs)
        assert str(err.value) == message


def test_bench_and_demo_commands_refuse_bad_numbers(capsys):
    from fibo import bench
    from fibo.envs import demos

    with pytest.raises(SystemExit) as stop:
        bench.main(["--sizes", "0"])
    assert stop.value.code == 2
    assert "error: argument --sizes: '0': comma-separated positive token counts, e.g. 196,784" in capsys.readouterr().err
    for args, message in ((["--num-demos", "0"], "error: --num-demos=0: at least 1 demo"),
                          (["--num-demos", "-3"], "error: --num-demos=-3: at least 1 demo"),
                          (["--noise", "-0.1"], "error: --noise=-0.1: the action noise std must be >= 0")):
        with pytest.raises(SystemExit) as stop:
            demos.main([*args, "--out", "unused.hdf5"])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^demos: num_demos=0: at least 1 demo$"):
        demos.write_demos("unused.hdf5", num_demos=0)


def test_sweep_runs_are_named_by_what_the_sweep_varies():
    from omegaconf import OmegaConf

    from fibo.launch import default_run_name, swept_overrides

    argv = ["-m", "task.lr=0.01,0.1", "seed=0,1", "attention=dense,fibottention", "trainer.max_epochs=3"]
    swept = swept_overrides(["task.lr=0.1", "seed=1", "attention=dense", "trainer.max_epochs=3"], argv)
    assert swept == ["task.lr=0.1"]
    choices = {"model": "vit_nano", "attention": "dense", "data": "digits"}
    assert default_run_name(OmegaConf.create({"seed": 1}), choices, swept) == "vit_nano-dense-digits-s1-task.lr=0.1"
    assert swept_overrides(["seed=1"], ["seed=1"]) == []
    # an Optuna trial: the drawn values are in the job's overrides, not on the command line
    trial = ["hydra/sweeper=optuna_fibo", "task.lr=0.0031", "attention.w_min=5", "seed=0"]
    assert swept_overrides(trial, ["-m", "hydra/sweeper=optuna_fibo"], ("task.lr", "attention.w_min")) == [
        "task.lr=0.0031", "attention.w_min=5"]
    # a robot policy: the head is part of the name (bc and diffusion runs of one encoder differ)
    robot = {"model": "policy_fibo", "model/head": "diffusion", "attention": "fibottention", "data": "lift"}
    assert default_run_name(OmegaConf.create({"seed": 0}), robot) == "policy_fibo-diffusion-fibottention-lift-s0"


def test_long_params_are_named_when_cut(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from fibo.tracking import run_lifecycle

    cfg = _lifecycle_cfg(tmp_path, f"+note={'x' * 300}")
    with run_lifecycle(cfg, dict(HydraConfig.get().runtime.choices), tmp_path / "out"):
        pass
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].data.params["note"] == "x" * 250
    assert runs[0].data.tags["params_truncated"] == "note (cut to 250 characters; full values: config/config.yaml)"


def test_fast_dev_run_records_the_printed_test_metrics_and_quotes_the_store(tmp_path, capsys):
    """Before: fast_dev_run printed a test accuracy that MLflow did not have; a store path with a
    space broke the printed `mlflow ui` line."""
    from fibo.cli import train

    root = tmp_path / "my root"
    root.mkdir()
    result = train(_lifecycle_cfg(root))
    out = capsys.readouterr().out
    assert f"browse: mlflow ui --backend-store-uri 'sqlite:///{root / 'mlflow.db'}'" in out
    _, runs = mlflow_runs(root, "fibo-debug")
    assert runs[0].data.metrics["test/acc1"] == pytest.approx(result)
    assert f"fibo: test/acc1 = {result:.4f}" in out


def test_a_store_whose_lock_is_held_names_the_lock(tmp_path):
    from filelock import FileLock

    from fibo.tracking import TrackingError, prepare_store

    db = tmp_path / "m.db"
    code = f"from filelock import FileLock; import time; l = FileLock('{db}.lock'); l.acquire(); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrackingError) as err:
            prepare_store(f"sqlite:///{db}", lock_timeout_s=0.5)
        assert str(err.value) == (f"MLflow store {db}: another process has held {db}.lock for 0.5 s while creating or "
                                  f"migrating the store; wait for it, or find the hung process (the lock is released "
                                  f"when its holder exits)")
    finally:
        holder.kill()
        holder.wait()
    prepare_store(f"sqlite:///{db}", lock_timeout_s=30)  # released with its holder
    assert FileLock(f"{db}.lock").acquire(timeout=1)


class NaNOnRankOne(__import__("fibo.tasks.base", fromlist=["BaseTask"]).BaseTask):
    """A linear model whose loss is NaN on DDP rank 1 only, from its second step."""

    def __init__(self) -> None:
        import torch

        super().__init__(torch.nn.Linear(4, 1), lr=0.1, warmup_epochs=0)

    def training_step(self, batch, batch_idx):
        loss = self.model(batch).pow(2).mean()
        return loss * float("nan") if self.global_rank == 1 and self.global_step >= 1 else loss

    def train_dataloader(self):
        import torch

        return torch.utils.data.DataLoader(torch.randn(32, 4), batch_size=4)


@pytest.mark.slow
def test_divergence_on_one_ddp_process_stops_every_process():
    """The finiteness decision is taken together, so no process waits in the next all-reduce for one
    that stopped; every process raises DivergedError at the same step."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception, match=r"training diverged: the loss is (nan|not finite on another DDP process) at "
                                         r"step 1 \(epoch 0\)"):
        trainer.fit(NaNOnRankOne())
