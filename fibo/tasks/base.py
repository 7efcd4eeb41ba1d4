"""The base task every fibo task inherits: optimizer, schedule, no-decay groups and lr scaling.

Optimizer and scheduler come from the task config as Hydra ``_partial_`` callables
(``conf/task/*.yaml``)::

    optimizer: {_target_: torch.optim.AdamW, _partial_: true}            # called as optimizer(param_groups, lr=, weight_decay=)
    scheduler: {_target_: fibo.tasks.schedule.warmup_cosine, _partial_: true}
                                                                          # called as scheduler(optimizer, total_steps=, warmup_steps=, min_lr_ratio=)

so that another optimizer or schedule is a config change. Without them (a task built in Python)
the defaults are AdamW and :func:`~fibo.tasks.schedule.warmup_cosine`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from fibo.tasks.schedule import warmup_cosine


class DivergedError(FloatingPointError):
    """The training loss stopped being finite: the run stops (FAILED), its earlier checkpoints stay."""


def check_recipe(lr: float, weight_decay: float, warmup_epochs: float, min_lr: float, batch_size: int | None,
                 lr_base_batch: int | None) -> None:
    """Raises ``ValueError`` (one line naming the config key and its range) for an optimisation
    option out of range: ``lr`` > 0, ``weight_decay``/``warmup_epochs``/``min_lr`` >= 0, batch sizes >= 1."""
    problems = [(not lr > 0, f"task.lr={lr} must be > 0 (e.g. task.lr=1e-3)"),
                (not weight_decay >= 0, f"task.weight_decay={weight_decay} must be >= 0"),
                (not warmup_epochs >= 0, f"task.warmup_epochs={warmup_epochs} must be >= 0"),
                (not min_lr >= 0, f"task.min_lr={min_lr} must be >= 0"),
                (batch_size is not None and batch_size < 1, f"data.batch_size={batch_size} must be >= 1"),
                (lr_base_batch is not None and lr_base_batch < 1, f"task.lr_base_batch={lr_base_batch} must be >= 1")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay, by timm's rule (biases, 1-d parameters such as
    norms, and the model's ``no_weight_decay()`` patterns: CLS token, position embeddings). Taken
    from the model as built, because FSDP later flattens every parameter into a 1-d shard."""
    patterns = tuple(getattr(model, "no_weight_decay", lambda: ())())
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in patterns)}


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper prefixes that FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class BaseTask(L.LightningModule):
    """A LightningModule around ``model`` (``self.model``) with fibo's optimisation recipe.

    A non-finite training loss (NaN, inf) stops training with :class:`DivergedError` before its
    backward pass can write NaN into the weights (checked on every process and decided together, so
    that no DDP process waits for one that stopped); the run ends FAILED with the step in its
    ``error`` tag, and the checkpoints written before stay.

    Args:
        model: the network; its parameter names decide the no-decay groups (decided here, at
            construction, before any FSDP wrapping).
        lr: learning rate, absolute unless ``lr_base_batch`` is set: then ``lr x global batch /
            lr_base_batch`` (the paper's ``1e-3 x batch / 256``); global batch = ``batch_size`` (per
            process) x processes x gradient accumulation.
        weight_decay: decoupled weight decay for every parameter except biases, 1-d parameters and the
            model's ``no_weight_decay()`` names (CLS token, position embeddings).
        warmup_epochs: linear warmup length in epochs (fractions allowed), converted to optimizer steps.
        min_lr: the learning rate the cosine ends at (absolute).
        batch_size: per-process batch size (the data config's), for lr scaling.
        lr_base_batch: the batch size ``lr`` is given for; ``None``: no scaling.
        optimizer: ``optimizer(param_groups, lr=, weight_decay=) -> torch.optim.Optimizer`` (a Hydra
            ``_partial_``); ``None``: ``torch.optim.AdamW``.
        scheduler: ``scheduler(optimizer, total_steps=, warmup_steps=, min_lr_ratio=) -> LRScheduler``
            stepped every optimizer step; ``None``: warmup + cosine.

    Raises:
        ValueError: an option out of range (:func:`check_recipe`).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 5,
                 min_lr: float = 1e-6, batch_size: int | None = None, lr_base_batch: int | None = None,
                 optimizer: Callable | None = None, scheduler: Callable | None = None) -> None:
        super().__init__()
        check_recipe(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr, batch_size=batch_size,
                     lr_base_batch=lr_base_batch)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler or warmup_cosine
        self._no_decay = no_weight_decay_names(model)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Raises :class:`DivergedError` when ``loss`` is not finite (on any process)."""
        local = bool(torch.isfinite(loss.detach()).all())
        finite = local
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(local, all=True)
        if not finite:
            step, epoch = (self.trainer.global_step, self.trainer.current_epoch) if self._trainer else (0, 0)
            what = "not finite on another DDP process" if local else str(float(loss.detach().float().mean()))
            raise DivergedError(
                f"training diverged: the loss is {what} at step {step} (epoch {epoch}), the run stops before this "
                f"step's update; lower task.lr (now {self.effective_lr:g}) or check the data for NaN/inf values")

    @property
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step: ``batch_size`` (per process) x processes x gradient accumulation."""
        hp, trainer = self.hparams, self._trainer
        if not hp.batch_size or trainer is None:
            return hp.batch_size
        return hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    @property
    def effective_lr(self) -> float:
        """``lr``, scaled by ``global batch / lr_base_batch`` when ``lr_base_batch`` is set."""
        hp = self.hparams
        if hp.lr_base_batch and hp.batch_size:
            return hp.lr * self.global_batch_size / hp.lr_base_batch
        return hp.lr

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups ``[{no decay}, {weight_decay}]`` from the model's *named*
        parameters (as timm's ``param_groups_weight_decay``; also under FSDP, whose wrapper prefixes
        are stripped); empty groups are left out."""
        wd = self.hparams.weight_decay
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if not wd or _unwrapped_name(name) in self._no_decay else decay).append(param)
        groups = ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        hp = self.hparams
        lr = self.effective_lr
        optimizer = self.optimizer_factory(self.param_groups(), lr=lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(total * hp.warmup_epochs / epochs)
        scheduler = self.scheduler_factory(optimizer, total_steps=total, warmup_steps=warmup,
                                           min_lr_ratio=hp.min_lr / max(lr, 1e-12))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
