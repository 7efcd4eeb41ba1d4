"""Image classification as a LightningModule."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fibo.tasks.schedule import warmup_cosine


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay, by timm's rule (biases, 1-d parameters such as
    norms, and the model's ``no_weight_decay()`` patterns: CLS token, position embeddings). Taken
    from the model as built, because FSDP later flattens every parameter into a 1-d shard."""
    import fnmatch

    patterns = tuple(getattr(model, "no_weight_decay", lambda: ())())
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pat) for pat in patterns)}


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrapper prefixes that FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class ImageClassifier(L.LightningModule):
    """Supervised classification of ``(B, C, H, W)`` images into ``num_classes`` classes.

    Loss: cross entropy with label smoothing. Optimiser: AdamW via ``timm.optim.create_optimizer_v2``
    (no weight decay on biases, norms, CLS token and position embedding, as timm/DeiT, also under
    FSDP), learning rate ``lr`` (times ``global batch / lr_base_batch`` when ``lr_base_batch`` is
    set: the paper's ``1e-3 x batch / 256``; the global batch is ``batch_size`` x processes x
    gradient accumulation), linear warmup for ``warmup_epochs`` then cosine decay to ``min_lr``.

    Metrics (torchmetrics, micro top-k accuracy in [0, 1]): ``train/loss``, ``train/acc1``,
    ``val/loss``, ``val/acc1``, ``val/acc5``, ``test/loss``, ``test/acc1``, ``test/acc5``.
    """

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self._no_decay = no_weight_decay_names(model)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_acc{k}": MulticlassAccuracy(num_classes=num_classes, top_k=kk, average="micro")
            for stage in ("train", "val", "test") for k, kk in ((1, 1), (5, top5))
        })

    @property
    def global_batch_size(self) -> int | None:
        """Samples per optimizer step: ``batch_size`` (per process) x processes x gradient accumulation."""
        hp, trainer = self.hparams, self._trainer
        if not hp.batch_size or trainer is None:
            return hp.batch_size
        return hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    @property
    def effective_lr(self) -> float:
        hp = self.hparams
        if hp.lr_base_batch and hp.batch_size:
            return hp.lr * self.global_batch_size / hp.lr_base_batch
        return hp.lr

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

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: ``[{no decay}, {weight_decay}]``, as timm's ``param_groups_weight_decay``."""
        wd = self.hparams.weight_decay
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if not wd or _unwrapped_name(name) in self._no_decay else decay).append(param)
        groups = ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        hp = self.hparams
        optimizer = create_optimizer_v2(self.param_groups(), opt="adamw", lr=self.effective_lr,
                                        weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(total * hp.warmup_epochs / epochs)
        scheduler = warmup_cosine(optimizer, total, warmup, min_lr_ratio=hp.min_lr / max(self.effective_lr, 1e-12))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
