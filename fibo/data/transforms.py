"""Image transforms: timm's ``create_transform`` (the paper's recipe: RandomResizedCrop, flip,
RandAugment, random erasing) with per-dataset settings from the ``data.augment`` config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.data import create_transform


def build_transform(
    img_size: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Mapping[str, Any] | None = None,
):
    """A PIL -> ``(C, img_size, img_size)`` float tensor transform.

    Args:
        img_size: output side in pixels.
        train: training transform (random crop/flip/RandAugment/erasing) or evaluation (resize only).
        mean, std: per-channel normalisation (length = channels).
        augment: keyword arguments of :func:`timm.data.create_transform` for training, e.g.
            ``{scale: [0.08, 1], hflip: 0.5, auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25}``.
    """
    if not train:
        return create_transform(img_size, is_training=False, crop_pct=1.0, interpolation="bicubic",
                                mean=tuple(mean), std=tuple(std))
    kwargs = dict(augment or {})
    for key in ("scale", "ratio"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    kwargs.setdefault("interpolation", "bicubic")
    kwargs.setdefault("color_jitter", 0.0)
    return create_transform(img_size, is_training=True, mean=tuple(mean), std=tuple(std), **kwargs)
