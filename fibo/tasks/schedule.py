"""Learning-rate schedule shared by the tasks: linear warmup then cosine decay, stepped per
optimizer step (the DeiT/timm recipe, expressed as a torch ``LambdaLR`` so it checkpoints and
resumes with Lightning)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """``LambdaLR`` whose factor rises linearly to 1 over ``warmup_steps`` then follows a cosine to
    ``min_lr_ratio`` at ``total_steps``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
