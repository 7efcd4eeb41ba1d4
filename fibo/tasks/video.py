"""Video action recognition as a LightningModule (training as image classification, on clips)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from fibo.tasks.image import ImageClassifier


class VideoClassifier(ImageClassifier):
    """Classifies clips ``(B, C, T, H, W)``; batches are ``(clips, labels, video_index)``.

    Training and validation score single clips (``train/*``, ``val/*``: one centred view per video
    in validation unless the DataModule gives more). Testing averages the logits of all views
    (temporal clips x spatial crops) of each video, then scores videos: ``test/acc1``,
    ``test/acc5`` are per video; ``test/clip_acc1`` per view. Same optimiser and schedule as
    :class:`~fibo.tasks.image.ImageClassifier`.
    """

    def on_test_epoch_start(self) -> None:
        self._video_logits: dict[int, torch.Tensor] = {}
        self._video_labels: dict[int, int] = {}

    def test_step(self, batch, batch_idx: int) -> None:
        clips, labels, video_index = batch
        logits = self(clips)
        self.log("test/loss", self.criterion(logits, labels), on_epoch=True, batch_size=len(labels))
        self.log("test/clip_acc1", (logits.argmax(-1) == labels).float().mean(), on_epoch=True, batch_size=len(labels))
        for logit, label, vid in zip(logits.detach().float().softmax(-1), labels.tolist(), video_index.tolist()):
            self._video_logits[vid] = self._video_logits.get(vid, 0) + logit
            self._video_labels[vid] = label

    def on_test_epoch_end(self) -> None:
        if not self._video_logits:
            return
        vids = sorted(self._video_logits)
        scores = torch.stack([self._video_logits[v] for v in vids])
        labels = torch.tensor([self._video_labels[v] for v in vids], device=scores.device)
        n = self.hparams.num_classes
        self.log("test/acc1", multiclass_accuracy(scores, labels, n, average="micro", top_k=1))
        self.log("test/acc5", multiclass_accuracy(scores, labels, n, average="micro", top_k=min(5, n)))
        self.log("test/videos", float(len(vids)))
