"""Video action recognition as a LightningModule (training as image classification, on clips)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from fibo.tasks.image import ImageClassifier


class VideoClassifier(ImageClassifier):
    """Classifies clips ``(B, C, T, H, W)``; batches are ``(clips, labels, video_index)``.

    Training and validation score single clips (``train/*``, ``val/*``: one centred view per video
    in validation unless the DataModule gives more). Testing sums the softmax outputs (class
    probabilities) of all views (temporal clips x spatial crops) of each video, then scores videos: ``test/acc1``,
    ``test/acc5`` are per video (under DDP the views of every process are gathered first);
    ``test/clip_acc1`` per view. Same optimiser and schedule as
    :class:`~fibo.tasks.image.ImageClassifier`.
    """

    modality = "video"

    def on_test_epoch_start(self) -> None:
        self._video_probs: dict[int, torch.Tensor] = {}
        self._video_labels: dict[int, int] = {}

    def test_step(self, batch, batch_idx: int) -> None:
        clips, labels, video_index = batch
        logits = self(clips)
        self.log("test/loss", self.criterion(logits, labels), on_epoch=True, batch_size=len(labels))
        self.log("test/clip_acc1", (logits.argmax(-1) == labels).float().mean(), on_epoch=True, batch_size=len(labels))
        for prob, label, vid in zip(logits.detach().float().softmax(-1), labels.tolist(), video_index.tolist()):
            self._video_probs[vid] = self._video_probs.get(vid, 0) + prob
            self._video_labels[vid] = label

    def on_test_epoch_end(self) -> None:
        n = self.hparams.num_classes
        local = max(self._video_probs, default=-1) + 1
        num_videos = int(self.all_gather(torch.tensor(local, device=self.device)).max()) if self._distributed else local
        if num_videos == 0:
            return
        # dense (video, class) sums so that every process contributes tensors of one shape: under DDP the
        # views of one video can land on different processes (DistributedSampler splits views)
        scores = torch.zeros(num_videos, n, device=self.device)
        labels = torch.full((num_videos,), -1, dtype=torch.long, device=self.device)
        for vid, prob in self._video_probs.items():
            scores[vid] += prob.to(self.device)
            labels[vid] = self._video_labels[vid]
        if self._distributed:
            scores = self.all_gather(scores).sum(0)
            labels = self.all_gather(labels).max(0).values
        seen = labels >= 0
        scores, labels = scores[seen], labels[seen]
        # every process now holds the same numbers: sync_dist only averages equal values
        self.log("test/acc1", multiclass_accuracy(scores, labels, n, average="micro", top_k=1), sync_dist=True)
        self.log("test/acc5", multiclass_accuracy(scores, labels, n, average="micro", top_k=min(5, n)), sync_dist=True)
        self.log("test/videos", float(len(labels)), sync_dist=True)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1
