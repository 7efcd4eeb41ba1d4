"""Multi-process training through the real ``fibo-run``: 2-process DDP on the CPU (gloo).

Only global rank zero may create, fill and end the MLflow run; a resume under DDP must continue that
run. (GPU strategies use the same code path with nccl; see conf/trainer/ddp.yaml, fsdp.yaml.)
"""

import re

import pytest
from torch import nn

from conftest import mlflow_runs

DDP = ("trainer=ddp_cpu", "trainer.devices=2", "debug=short", "trainer.limit_train_batches=3",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "task.warmup_epochs=0")


@pytest.mark.slow
def test_ddp_cpu_logs_one_run_from_rank_zero_and_resumes(tmp_path, run_fibo):
    first = run_fibo(*DDP, "trainer.max_epochs=1", root=tmp_path, timeout=300)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out, "Lightning did not start a second process"
    assert first.stdout.count("fibo: test/acc1 = ") == 1, "the result is reported by rank zero only"

    client, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "val/acc1", "test/acc1", "attention/density"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    assert run.data.params["trainer/devices"] == "2" and run.data.tags["choice.trainer"] == "ddp_cpu"
    assert len(client.get_metric_history(run.info.run_id, "val/acc1")) == 1  # not once per process

    run_dirs = list((tmp_path / "logs" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs  # the second process writes into the same Hydra run dir
    assert (run_dirs[0] / "train_ddp_process_1.log").is_file()
    ckpt = run_dirs[0] / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    second = run_fibo(*DDP, "trainer.max_epochs=2", "test=false", f"ckpt_path={ckpt}", root=tmp_path, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "Restoring states from the checkpoint path" in out and "MEMBER: 2/2" in out
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # the same run continues, no new one
    assert runs[0].info.status == "FINISHED"
    epochs = {m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")}
    assert len(epochs) == 2, epochs
    assert re.search(r"MLflow run " + run.info.run_id, second.stdout)


@pytest.mark.slow
def test_ddp_video_test_scores_every_video_once(tmp_path, run_fibo):
    """Under DDP the views of the test videos are split across processes; per-video scores gather
    them first, so test/videos counts the whole test split (96 moving-digit videos), not a share."""
    from fibo.data.moving_digits import MovingDigitsSpec

    result = run_fibo("task=video", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=1",
                      "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", root=tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out
    _, runs = mlflow_runs(tmp_path, "fibo")
    assert len(runs) == 1
    assert runs[0].data.metrics["test/videos"] == 4 * MovingDigitsSpec().per_class[2] == 96


def test_strategy_configs_compose_and_instantiate():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from fibo.cli import CONF_DIR
    from fibo.models.vit import Block

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        ddp = compose("config", overrides=["trainer=ddp", "trainer.num_nodes=2"]).trainer
        fsdp = compose("config", overrides=["trainer=fsdp"]).trainer
        cpu = compose("config", overrides=["trainer=ddp_cpu"]).trainer
    assert (ddp.accelerator, ddp.devices, ddp.num_nodes) == ("gpu", -1, 2)
    assert isinstance(instantiate(ddp.strategy), DDPStrategy)
    assert (cpu.accelerator, cpu.devices, cpu.strategy.process_group_backend) == ("cpu", 2, "gloo")
    strategy = instantiate(fsdp.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}  # DividedBlock is a Block too


class _Wrapped(nn.Module):  # FSDP's naming: wrapped modules hang under `_fsdp_wrapped_module`
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_weight_decay_groups_match_timm_and_survive_fsdp(weight_decay):
    from timm.optim._param_groups import param_groups_weight_decay

    from fibo.models import create_model
    from fibo.tasks.image import ImageClassifier

    model = create_model("vit_nano", img_size=16, patch_size=2, in_chans=1, num_classes=10)
    task = ImageClassifier(model, num_classes=10, weight_decay=weight_decay)
    timm_groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay())

    def ids(groups):
        return [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups]

    assert ids(task.param_groups()) == ids(timm_groups)
    # FSDP (use_orig_params) renames parameters and turns each into a 1-d view of its shard:
    # the grouping must not change (a shape rule alone would exempt every weight from decay)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = _Wrapped(block)
    task.model = _Wrapped(model)
    for p in model.parameters():
        p.data = p.data.reshape(-1)
    assert ids(task.param_groups()) == ids(timm_groups)



def test_robot_task_weight_decay_groups_survive_fsdp():
    """The robot task used timm's create_optimizer_v2(model): its shape rule, applied to FSDP's 1-d
    flattened parameters, exempted every weight from decay. Now BaseTask's named-parameter groups."""
    from fibo.models.policy import create_policy
    from fibo.tasks.robot import BehaviorCloning

    policy = create_policy("none", [], {"robot0_eef_pos": 3}, 7, frame_stack=1, seq_length=1)
    task = BehaviorCloning(policy, weight_decay=0.01)
    matrices = {id(p) for p in policy.parameters() if p.ndim >= 2}
    assert matrices

    def decayed(groups):
        return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    assert decayed(task.param_groups()) == matrices
    task.model = _Wrapped(policy)
    for p in policy.parameters():
        p.data = p.data.reshape(-1)
    assert decayed(task.param_groups()) == matrices
    trainer = type("T", (), {"estimated_stepping_batches": 10, "max_epochs": 2, "world_size": 1,
                             "accumulate_grad_batches": 1})()
    task._trainer = trainer
    optimizer = task.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]} == matrices

def test_slurm_launcher_config_follows_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
    from hydra import compose, initialize_config_dir

    from fibo.cli import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # one task per GPU
    assert launcher.partition == "gpu" and launcher.timeout_min > 0


@pytest.mark.slow
def test_submitit_runs_a_job(tmp_path, run_fibo):
    """The submitit path end to end on this machine (the local executor instead of SLURM)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
    result = run_fibo("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "debug=fast_dev_run",
                      root=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert list((tmp_path / "logs" / "multiruns").glob("*/.submitit/*/*_log.out"))


@pytest.mark.slow
def test_ddp_in_a_multirun_job_runs_that_job_only(tmp_path, run_fibo):
    """Before: Lightning started the second process with the whole sweep (`-m ...`), which re-ran it
    into an extra logs/multiruns/<time>/ folder."""
    result = run_fibo("-m", "seed=0", "trainer=ddp_cpu", "trainer.devices=2", "debug=fast_dev_run", root=tmp_path,
                      timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "MEMBER: 2/2" in out
    sweeps = list((tmp_path / "logs" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    assert (sweeps[0] / "0" / "train_ddp_process_1.log").is_file(), sorted(p.name for p in (sweeps[0] / "0").iterdir())
    assert not (tmp_path / "logs" / "runs").exists()
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert [r.info.status for r in runs] == ["FINISHED"]
