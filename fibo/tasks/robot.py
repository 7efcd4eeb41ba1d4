"""Imitation learning from demonstrations (robomimic's BC, or Chi et al.'s diffusion policy) as a
LightningModule.

Batches come from :class:`fibo.data.robomimic.RobomimicDataModule` (robomimic's ``SequenceDataset``):
``{"obs": {key: (B, F, ...)}, "actions": (B, T, A)}``. Low-dim observations are normalised with
mean/std of the training demos; actions with mean/std (BC head) or mapped from the demos' range to
[-1, 1] (diffusion head: ``policy.action_normalization == "limits"``). Those statistics travel in
the checkpoint (``checkpoint["fibo_normalization"]``), so a saved policy acts in the environment on
its own.

Loss: the policy's ``compute_loss`` with ``task.loss`` (``mse``, robomimic BC's L2, or ``l1`` /
``smooth_l1``): the BC head regresses the action chunk, the diffusion head predicts the noise added
to it. **Padded steps count**, as in robomimic's BC (``robomimic.algo.bc.BC._compute_losses`` takes no
mask) and in Chi et al.'s diffusion policy (its sampler pads and its loss mask is only for
inpainting): a chunk that runs past the end of a demo is padded by ``SequenceDataset`` with the
demo's last action, so the policy learns to hold the final action there. With ``seq_length=1``
nothing is padded.

EMA (``task.ema``, the diffusion head's default): timm's ``ModelEmaV3`` keeps an exponential moving
average of the policy's weights after every optimizer step (decay warmup ``1 - (1 + step) ** -power``
up to ``decay``); validation, rollouts (:meth:`BehaviorCloning.agent`) and the checkpoint's
``ema.module.*`` entries use it. Metrics: ``train/loss``, ``val/loss``; with the diffusion head also
``val/action_mse`` (sampled chunk vs. demo, normalised units).
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
ACTION_NORMALIZATIONS = ("gaussian", "limits")


class Normalizer:
    """Per-key normalisation from ``{"actions": {"mean", "std"[, "min", "max"]}, "obs": {key: {"mean", "std"}}}``.

    Observations: ``(x - mean) / std``. Actions: ``gaussian`` (the same) or ``limits``: the demos' range
    ``[min, max]`` -> ``[-1, 1]`` per dimension; a dimension whose range is below ``range_eps`` (constant
    in the demos) is shifted so that its value maps to 0 and not scaled (as Chi et al.'s normaliser).

    Raises:
        ValueError: an unknown ``actions`` mode; ``limits`` with statistics that have no min/max.
    """

    def __init__(self, stats: Mapping[str, Any], actions: str = "gaussian", range_eps: float = 1e-4) -> None:
        if actions not in ACTION_NORMALIZATIONS:
            raise ValueError(f"action normalisation {actions!r} must be one of {list(ACTION_NORMALIZATIONS)}")
        self.stats = {"actions": {k: list(map(float, v)) for k, v in stats["actions"].items()},
                      "obs": {key: {k: list(map(float, v)) for k, v in s.items()} for key, s in stats["obs"].items()}}
        if actions == "limits" and not {"min", "max"} <= set(self.stats["actions"]):
            raise ValueError("the diffusion head normalises actions by their range, but these statistics have no "
                             "action min/max (a checkpoint or stats from before fibo computed them): recompute the "
                             "statistics from the data (train again through RobomimicDataModule)")
        self.mode, self.range_eps = actions, float(range_eps)
        self._cache: dict = {}

    def _get(self, group: str, key: str | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, scale)`` with normalised = ``(x - offset) / scale``."""
        cache_key = (group, key, str(device))
        if cache_key not in self._cache:
            s = self.stats["actions"] if group == "actions" else self.stats["obs"][key]
            if group == "actions" and self.mode == "limits":
                low, high = np.asarray(s["min"]), np.asarray(s["max"])
                span = high - low
                constant = span < self.range_eps
                offset, scale = np.where(constant, low, (high + low) / 2), np.where(constant, 1.0, span / 2)
            else:
                offset, scale = np.asarray(s["mean"]), np.asarray(s["std"])
            self._cache[cache_key] = (torch.tensor(offset, dtype=torch.float32, device=device),
                                      torch.tensor(scale, dtype=torch.float32, device=device))
        return self._cache[cache_key]

    def obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(obs)
        for key in self.stats["obs"]:
            if key in out:
                mean, std = self._get("obs", key, out[key].device)
                out[key] = (out[key].float() - mean) / std
        return out

    def actions(self, actions: torch.Tensor) -> torch.Tensor:
        offset, scale = self._get("actions", None, actions.device)
        return (actions.float() - offset) / scale

    def unactions(self, actions: torch.Tensor) -> torch.Tensor:
        offset, scale = self._get("actions", None, actions.device)
        return actions * scale + offset


def make_ema(model: nn.Module, decay: float = 0.9999, power: float = 0.75, gamma: float = 1.0, min_decay: float = 0.0):
    """timm's ``ModelEmaV3`` of ``model`` with decay warmup ``min(decay, 1 - (1 + step / gamma) ** -power)``
    (Chi et al.'s EMA schedule); its copy gets no gradients (DDP ignores it).

    Raises:
        ValueError: ``decay`` outside (0, 1) or ``power`` <= 0 (naming ``model.head.ema``).
    """
    from timm.utils import ModelEmaV3

    if not 0 < decay < 1 or not power > 0:
        raise ValueError(f"model.head.ema: decay={decay} must be in (0, 1) and power={power} > 0 (e.g. decay 0.9999, "
                         f"power 0.75)")
    ema = ModelEmaV3(model, decay=decay, min_decay=min_decay, use_warmup=True, warmup_gamma=gamma, warmup_power=power)
    ema.module.requires_grad_(False)
    return ema


class BehaviorCloning(BaseTask):
    """Imitate the demonstrated (normalised) action chunk from the observation history, with the
    policy's head (BC regression or diffusion); see the module docstring.

    Args:
        model: a :class:`fibo.models.policy.ObservationPolicy` (``BCPolicy`` or ``DiffusionPolicy``).
        lr, weight_decay, warmup_epochs, min_lr, batch_size, lr_base_batch, optimizer, scheduler:
            :class:`~fibo.tasks.base.BaseTask` (AdamW with linear warmup + cosine decay; no-decay
            groups from the named parameters, so also under FSDP).
        loss: ``mse`` | ``l1`` | ``smooth_l1``.
        ema: ``None`` (no averaging) or :func:`make_ema` keywords (``decay``, ``power``, ...).
        agent_seed: seed of the rollout agent's sampling noise (episode ``i`` of every evaluation
            draws from ``agent_seed + i``: paired across evaluations, global RNG untouched).
    """

    modality = "robot"  # the data family it trains on (fibo.config_check.check_task_data)

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01, warmup_epochs: float = 1,
                 min_lr: float = 1e-5, loss: str = "mse", batch_size: int | None = None,
                 lr_base_batch: int | None = None, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, ema: Mapping[str, Any] | None = None, agent_seed: int = 0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"task.loss={loss!r} must be one of {sorted(LOSSES)}")
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
                         batch_size=batch_size, lr_base_batch=lr_base_batch, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.loss_fn = LOSSES[loss]
        self.normalizer: Normalizer | None = None
        self.ema = make_ema(model, **dict(ema)) if ema else None
        self.agent_seed = int(agent_seed)

    @property
    def action_normalization(self) -> str:
        return getattr(self.model, "action_normalization", "gaussian")

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated (validation, rollouts): the EMA copy if there is one."""
        return self.ema.module if self.ema is not None else self.model

    # -- normalisation statistics ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.normalizer is None and datamodule is not None and hasattr(datamodule, "normalization_stats"):
            self.normalizer = Normalizer(datamodule.normalization_stats(), actions=self.action_normalization)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.normalizer is not None:
            checkpoint["fibo_normalization"] = self.normalizer.stats

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "fibo_normalization" in checkpoint:
            self.normalizer = Normalizer(checkpoint["fibo_normalization"], actions=self.action_normalization)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations -> normalised action chunk ``(B, T, A)`` of the training weights
        (the diffusion head samples one)."""
        return self.model(obs)

    def _normalised(self, batch: Mapping[str, Any]) -> tuple[dict, torch.Tensor]:
        if self.normalizer is None:
            raise RuntimeError("no normalisation statistics: train through RobomimicDataModule or load a fibo checkpoint")
        return self.normalizer.obs(batch["obs"]), self.normalizer.actions(batch["actions"])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        obs, target = self._normalised(batch)
        loss = self.model.compute_loss(obs, target, self.loss_fn)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        obs, target = self._normalised(batch)
        model = self.eval_model
        loss = model.compute_loss(obs, target, self.loss_fn)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target))
        if self.action_normalization == "limits":  # a sampling head: also how far its sampled chunks are
            generator = torch.Generator(device=target.device).manual_seed(batch_idx)
            mse = F.mse_loss(model.predict(obs, generator=generator), target)
            self.log("val/action_mse", mse, on_step=False, on_epoch=True, batch_size=len(target))

    # -- acting -----------------------------------------------------------------------------------
    def agent(self) -> PolicyAgent:
        """A receding-horizon agent of the evaluated weights (:attr:`eval_model`)."""
        return PolicyAgent(self, seed=self.agent_seed)


class PolicyAgent:
    """Runs a trained :class:`BehaviorCloning` in an environment, receding-horizon style: keeps the
    last F = ``frame_stack`` observations (the first one repeated at the start of an episode, like
    robomimic's frame-stack padding), predicts a chunk of ``seq_length`` actions and executes its first
    ``n_action_steps`` (denormalised, clipped to [-1, 1]) before predicting again. One prediction per
    ``n_action_steps`` env steps; BC's default (1) replans at every step as robomimic does.

    Sampling noise (diffusion head) comes from the agent's own generator, reseeded at every
    :meth:`reset` (``seed + episode index``), so evaluations are repeatable and paired.
    """

    def __init__(self, task: BehaviorCloning, seed: int = 0) -> None:
        self.task = task
        self.policy = task.eval_model
        self.frame_stack = int(getattr(self.policy, "frame_stack", 1))
        self.n_action_steps = int(getattr(self.policy, "n_action_steps", 1))
        self.keys = list(getattr(self.policy, "rgb_keys", [])) + list(getattr(self.policy, "low_dim_keys", {}))
        self.rgb = set(getattr(self.policy, "rgb_keys", []))
        self.history: deque = deque(maxlen=self.frame_stack)
        self.queue: deque = deque()
        self.seed, self.episodes, self.predictions = int(seed), 0, 0
        self.generator = torch.Generator(device=task.device)

    def reset(self) -> None:
        """A new episode: empty history and action queue, the sampling noise reseeded."""
        self.history.clear()
        self.queue.clear()
        self.generator.manual_seed(self.seed + self.episodes)
        self.episodes += 1

    def _tensor(self, key: str, values: list[np.ndarray]) -> torch.Tensor:
        x = torch.as_tensor(np.stack(values))
        if key in self.rgb:  # (F, H, W, 3) uint8 -> (F, 3, H, W) in [0, 1], as robomimic's process_obs
            x = x.permute(0, 3, 1, 2).float() / 255.0
        return x.float().unsqueeze(0).to(self.task.device)

    @torch.no_grad()
    def predict_chunk(self) -> np.ndarray:
        """``(seq_length, A)`` denormalised actions for the current history."""
        batch = {k: self._tensor(k, [o[k] for o in self.history]) for k in self.keys}
        was_training = self.policy.training
        self.policy.eval()
        try:
            normalizer = self.task.normalizer
            chunk = normalizer.unactions(self.policy.predict(normalizer.obs(batch), generator=self.generator))
        finally:
            self.policy.train(was_training)
        self.predictions += 1
        return chunk[0].cpu().numpy().astype(np.float64)

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"the environment does not provide observation(s) {missing} the policy needs; it has {sorted(obs)}")
        if not self.history:
            for _ in range(self.frame_stack - 1):
                self.history.append(obs)
        self.history.append(obs)
        if not self.queue:
            self.queue.extend(self.predict_chunk()[: self.n_action_steps])
        return np.clip(self.queue.popleft(), -1.0, 1.0)
