"""Small Lightning callbacks that the tasks share."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

from fibo.tracking import RUN_ID_KEY


def _batch_size(batch) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)


class EpochThroughput(L.Callback):
    """Logs ``train/throughput``: training samples per second over each training epoch, from the
    epoch's start to its last training batch (data loading, forward, backward and optimizer step
    included; the validation run at the end of the epoch excluded). Measured on rank zero and
    counted for all processes (x ``world_size``: DistributedSampler gives every process equal shares),
    so DDP runs compare with single-device runs."""

    def __init__(self) -> None:
        self._start = self._last = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += _batch_size(batch)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        elapsed = self._last - self._start
        if self._samples and elapsed > 0:
            total = self._samples * trainer.world_size
            pl_module.log("train/throughput", total / elapsed, on_epoch=True, rank_zero_only=True)


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the latest epoch.

    Lightning 2.6 rewrites ``save_last`` only at steps where a top-k checkpoint was saved, so with
    ``monitor`` set ``last.ckpt`` is the last *improved* epoch and a resume from it repeats epochs.
    Here ``last.ckpt`` is written at every checkpointing point (end of validation, or of the training
    epoch) as ``save_last`` documents; top-k behaviour is Lightning's.

    No public Lightning API exists for this: it uses ModelCheckpoint's private
    ``_should_skip_saving_checkpoint``, ``_last_global_step_saved``, ``_save_last_checkpoint``,
    ``_monitor_candidates`` and ``_should_save_on_train_epoch_end`` (Lightning 2.6);
    ``tests/test_callbacks.py`` fails if an upgrade changes them.
    """

    def _ensure_last(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) \
                and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)


class RunIdInCheckpoint(L.Callback):
    """Stores the MLflow run id in every checkpoint (``checkpoint[fibo.tracking.RUN_ID_KEY]``) so that
    ``fibo-run ckpt_path=...`` continues the same run."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            checkpoint[RUN_ID_KEY] = logger.run_id
