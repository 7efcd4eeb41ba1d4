"""fibo's Lightning callbacks on a real (tiny) Trainer run."""

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from fibo.callbacks import ModelCheckpoint


class WorseEachEpoch(BoringModel):
    """val/acc1 = 1 / (epoch + 1): only epoch 0 is ever the best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc1", 1.0 / (self.current_epoch + 1))
        return super().validation_step(batch, batch_idx)


def test_last_checkpoint_is_the_latest_epoch_not_the_best(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc1", mode="max", save_last=True)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                        callbacks=[ckpt], logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(WorseEachEpoch())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["epoch"] == 0
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # Lightning's own callback leaves epoch 0 here


# ---------------------------------------------------------------- rollout evaluation (issue #15)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from fibo.envs.evaluation import RolloutEvaluation  # noqa: E402


class Walk:
    """A 1-d walk: each step moves by the action; success at position 3."""

    image_keys: list = []

    def reset(self, seed=None):
        self.x = 0.0
        return {"x": np.array([self.x])}

    def step(self, action):
        self.x += float(action[0])
        return {"x": np.array([self.x])}, 0.0, False, {}

    def is_success(self):
        return self.x >= 3

    def render(self, camera, size):
        return np.zeros((size, size, 3), np.uint8)

    def close(self):
        pass


class WalkRollouts(RolloutEvaluation):
    """Rollouts in :class:`Walk`; marks which processes built an environment and what each one holds."""

    def make_env(self, trainer, pl_module):
        (Path(trainer.default_root_dir) / f"env_rank{trainer.global_rank}").touch()
        self.horizon = 5
        return Walk()

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        (Path(trainer.default_root_dir) / f"results_rank{trainer.global_rank}.json").write_text(json.dumps(self.results))


class Stepper:
    def reset(self):
        pass

    def act(self, obs):
        return np.ones(1)


class Policy(BoringModel):
    def agent(self):
        return Stepper()


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _rollout_trainer(tmp_path, **kwargs):
    return L.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_rollouts_log_through_the_logger_not_callback_metrics(tmp_path):
    """Before: the callback wrote rollout/* into trainer.callback_metrics."""
    from fibo.cli import fit_result

    rollouts, recorder = WalkRollouts(num_episodes=2, video_episodes=0), Recorder()
    trainer = _rollout_trainer(tmp_path, callbacks=[rollouts], logger=recorder)
    trainer.fit(Policy())
    assert not [k for k in trainer.callback_metrics if k.startswith("rollout/")]
    logged = [m for m in recorder.metrics if "rollout/success_rate" in m]
    assert len(logged) == 1 and logged[0]["rollout/success_rate"] == 1.0 and logged[0]["rollout/mean_length"] == 3.0
    assert rollouts.results[-1]["successes"] == [True, True] and rollouts.results[-1]["epoch"] == 1
    assert fit_result(trainer, "rollout/success_rate") == 1.0  # fibo-run's headline
    assert json.loads((tmp_path / "rollouts" / "epoch001.json").read_text())["seeds"] == [100000, 100001]


@pytest.mark.slow
def test_rollouts_run_on_rank_zero_only_and_reach_every_process(tmp_path):
    """Before: every DDP process built an environment and rolled out."""
    trainer = _rollout_trainer(tmp_path, callbacks=[WalkRollouts(num_episodes=2, video_episodes=0)], logger=False,
                               accelerator="cpu", strategy="ddp_spawn", devices=2)
    trainer.fit(Policy())
    assert sorted(p.name for p in tmp_path.glob("env_rank*")) == ["env_rank0"]
    held = [json.loads((tmp_path / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    assert held[0] == held[1] and held[0][-1]["rollout/success_rate"] == 1.0
