"""Behaviour cloning (robomimic's BC) as a LightningModule.

Batches come from :class:`fibo.data.robomimic.RobomimicDataModule` (robomimic's ``SequenceDataset``):
``{"obs": {key: (B, F, ...)}, "actions": (B, T, A)}``. Low-dim observations and actions are
normalised with mean/std computed on the training demos; those statistics travel in the checkpoint
(``checkpoint["fibo_normalization"]``), so a saved policy acts in the environment on its own.

Loss: ``mse`` (robomimic BC's L2) or ``l1`` / ``smooth_l1`` over the whole action chunk. Padded
steps count, as in robomimic's BC (``robomimic.algo.bc.BC._compute_losses`` takes no mask): a chunk
that runs past the end of a demo is padded by ``SequenceDataset`` with the demo's last action, so
the policy learns to hold the final action there. With ``data.seq_length=1`` nothing is padded.
Metrics: ``train/loss``, ``val/loss``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fibo.tasks.base import BaseTask

log = logging.getLogger("fibo")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


class Normalizer:
    """``(x - mean) / std`` per key, from ``{"actions": {"mean", "std"}, "obs": {key: {"mean", "std"}}}``."""

    def __init__(self, stats: Mapping[str, Any]) -> None:
        self.stats = {"actions": {k: list(map(float, v)) for k, v in stats["actions"].items()},
                      "obs": {key: {k: list(map(float, v)) for k, v in s.items()} for key, s in stats["obs"].items()}}
        self._cache: dict = {}

    def _get(self, group: str, key: str | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        cache_key = (group, key, str(device))
        if cache_key not in self._cache:
            s = self.stats["actions"] if group == "actions" else self.stats["obs"][key]
            self._cache[cache_key] = (torch.tensor(s["mean"], dtype=torch.float32, device=device),
                                      torch.tensor(s["std"], dtype=torch.float32, device=device))
        return self._cache[cache_key]

    def obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(obs)
        for key in self.stats["obs"]:
            if key in out:
                mean, std = self._get("obs", key, out[key].device)
                out[key] = (out[key].float() - mean) / std
        return out

    def actions(self, actions: torch.Tensor) -> torch.Tensor:
        mean, std = self._get("actions", None, actions.device)
        return (actions.float() - mean) / std

    def unactions(self, actions: torch.Tensor) -> torch.Tensor:
        mean, std = self._get("actions", None, actions.device)
        return actions * std + mean


class BehaviorCloning(BaseTask):
    """Regress the demonstrated (normalised) action chunk from the observation history.

    Args:
        model: a :class:`fibo.models.policy.BCPolicy`.
        lr, weight_decay, warmup_epochs, min_lr, batch_size, lr_base_batch, optimizer, scheduler:
            :class:`~fibo.tasks.base.BaseTask` (AdamW with linear warmup + cosine decay; no-decay
            groups from the named parameters, so also under FSDP).
        loss: ``mse`` | ``l1`` | ``smooth_l1``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01, warmup_epochs: float = 1,
                 min_lr: float = 1e-5, loss: str = "mse", batch_size: int | None = None,
                 lr_base_batch: int | None = None, optimizer: Callable | None = None,
                 scheduler: Callable | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss!r} must be one of {sorted(LOSSES)}")
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
                         batch_size=batch_size, lr_base_batch=lr_base_batch, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.loss_fn = LOSSES[loss]
        self.normalizer: Normalizer | None = None

    # -- normalisation statistics ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.normalizer is None and datamodule is not None and hasattr(datamodule, "normalization_stats"):
            self.normalizer = Normalizer(datamodule.normalization_stats())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.normalizer is not None:
            checkpoint["fibo_normalization"] = self.normalizer.stats

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "fibo_normalization" in checkpoint:
            self.normalizer = Normalizer(checkpoint["fibo_normalization"])

    # -- training ---------------------------------------------------------------------------------
    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations -> normalised action chunk ``(B, T, A)``."""
        return self.model(obs)

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        if self.normalizer is None:
            raise RuntimeError("no normalisation statistics: train through RobomimicDataModule or load a fibo checkpoint")
        obs = self.normalizer.obs(batch["obs"])
        target = self.normalizer.actions(batch["actions"])
        pred = self(obs)
        loss = self.loss_fn(pred, target)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    # -- acting -----------------------------------------------------------------------------------
    def agent(self) -> PolicyAgent:
        return PolicyAgent(self)


class PolicyAgent:
    """Runs a trained :class:`BehaviorCloning` in an environment: keeps the last F observations
    (the first one repeated at the start of an episode, like robomimic's frame-stack padding),
    predicts an action chunk and executes its first action (denormalised, clipped to [-1, 1])."""

    def __init__(self, task: BehaviorCloning) -> None:
        self.task = task
        self.policy = task.model
        self.frame_stack = int(getattr(self.policy, "frame_stack", 1))
        self.keys = list(getattr(self.policy, "rgb_keys", [])) + list(getattr(self.policy, "low_dim_keys", {}))
        self.rgb = set(getattr(self.policy, "rgb_keys", []))
        self.history: deque = deque(maxlen=self.frame_stack)

    def reset(self) -> None:
        self.history.clear()

    def _tensor(self, key: str, values: list[np.ndarray]) -> torch.Tensor:
        x = torch.as_tensor(np.stack(values))
        if key in self.rgb:  # (F, H, W, 3) uint8 -> (F, 3, H, W) in [0, 1], as robomimic's process_obs
            x = x.permute(0, 3, 1, 2).float() / 255.0
        return x.float().unsqueeze(0).to(self.task.device)

    @torch.no_grad()
    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"the environment does not provide observation(s) {missing} the policy needs; it has {sorted(obs)}")
        if not self.history:
            for _ in range(self.frame_stack - 1):
                self.history.append(obs)
        self.history.append(obs)
        batch = {k: self._tensor(k, [o[k] for o in self.history]) for k in self.keys}
        was_training = self.policy.training
        self.policy.eval()
        chunk = self.task.normalizer.unactions(self.task(self.task.normalizer.obs(batch)))
        if was_training:
            self.policy.train()
        return np.clip(chunk[0, 0].cpu().numpy().astype(np.float64), -1.0, 1.0)
