"""Accuracy of a classifier over a data loader, with whatever hooks are registered meanwhile.

Batches are ``(inputs, labels)`` (images) or ``(clips, labels, video_index)`` (video: the softmax
outputs of a video's views are summed and the video is scored, as ``VideoClassifier.test_step``
does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable, device: torch.device, max_samples: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) over ``batches``, stopping after
    ``max_samples`` inputs (views, for video) when given.

    Raises:
        ValueError: no sample was seen.
    """
    model.eval()
    scores: dict[int, torch.Tensor] = {}
    labels: dict[int, int] = {}
    seen = 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        ids = batch[2][: len(y)].tolist() if len(batch) > 2 else list(range(seen, seen + len(y)))
        probs = model(x.to(device)).float().softmax(-1).cpu()
        for p, label, i in zip(probs, y.tolist(), ids):
            scores[i] = scores.get(i, 0) + p
            labels[i] = label
        seen += len(y)
        if max_samples is not None and seen >= max_samples:
            break
    if not scores:
        raise ValueError("no sample to evaluate: the split is empty (or max_samples=0)")
    correct = sum(int(scores[i].argmax()) == labels[i] for i in scores)
    return correct / len(scores)
