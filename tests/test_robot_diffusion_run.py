"""`fibo-run task=robot model/head=diffusion` from scratch (3 generated demos, 2 tiny epochs): trains,
rolls out twice on the same seeds and logs the protocol's final / best / last-k and the EMA weights."""

import json

import pytest

from conftest import mlflow_runs

pytestmark = pytest.mark.slow


def test_fibo_run_diffusion_head_end_to_end(tmp_path, run_fibo):
    result = run_fibo("task=robot", "model/head=diffusion", "model.head.down_dims=[16,32]", "data.generate.num_demos=3",
                      "data.batch_size=32", "trainer.max_epochs=2", "callbacks.rollout.every_n_epochs=1",
                      "callbacks.rollout.num_episodes=2", "callbacks.rollout.horizon=10",
                      "callbacks.rollout.video_episodes=0", root=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    _, runs = mlflow_runs(tmp_path)
    metrics = runs[0].data.metrics
    assert metrics["rollout/evaluations"] == 2 and metrics["rollout/episodes"] == 2
    for key in ("rollout/success_rate_final", "rollout/success_rate_best", "rollout/success_rate_last_k",
                "val/action_mse", "cost/model_flops"):
        assert key in metrics, sorted(metrics)
    summary = json.loads(next((tmp_path / "logs").rglob("rollouts/summary.json")).read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1] and summary["seeds"] == [100000, 100001]
    import torch

    ckpt = torch.load(next((tmp_path / "logs").rglob("checkpoints/last.ckpt")), weights_only=False)
    assert any(k.startswith("ema.module.diffusion.unet.") for k in ckpt["state_dict"])
    assert set(ckpt["fibo_normalization"]["actions"]) == {"mean", "std", "min", "max"}
