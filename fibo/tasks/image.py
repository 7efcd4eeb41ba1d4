"""Image classification as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fibo.tasks.base import BaseTask, no_weight_decay_names  # noqa: F401 - re-exported


class ImageClassifier(BaseTask):
    """Supervised classification of ``(B, C, H, W)`` images into ``num_classes`` classes.

    Loss: cross entropy with label smoothing. Optimiser, schedule, no-decay groups and lr scaling:
    :class:`~fibo.tasks.base.BaseTask` (AdamW, linear warmup for ``warmup_epochs`` then cosine decay
    to ``min_lr``; no weight decay on biases, norms, CLS token and position embedding).

    Metrics (torchmetrics, micro top-k accuracy in [0, 1]): ``train/loss``, ``train/acc1``,
    ``val/loss``, ``val/acc1``, ``val/acc5``, ``test/loss``, ``test/acc1``, ``test/acc5``.
    """

    modality = "image"  # the data family it trains on (fibo.config_check.check_task_data)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        batch_size: int | None = None,
        lr_base_batch: int | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ) -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
                         batch_size=batch_size, lr_base_batch=lr_base_batch, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_acc{k}": MulticlassAccuracy(num_classes=num_classes, top_k=kk, average="micro")
            for stage in ("train", "val", "test") for k, kk in ((1, 1), (5, top5))
        })

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.model(images)

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.criterion(logits, labels)
        # sync_dist: under DDP the epoch mean is over every process's batches (reduced once per epoch)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)
        for k in (1, 5):
            if stage == "train" and k == 5:
                continue
            metric = self.metrics[f"{stage}_acc{k}"]
            metric(logits, labels)
            self.log(f"{stage}/acc{k}", metric, on_step=False, on_epoch=True, prog_bar=k == 1, batch_size=len(labels))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")
