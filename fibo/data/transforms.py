"""Image transforms: timm's ``create_transform`` (the paper's recipe: RandomResizedCrop, flip,
RandAugment, random erasing) with per-dataset settings from the ``data.augment`` config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from timm.data import create_transform


def check_img_size(value: Any, square_only: str | None = None, key: str = "data.img_size") -> int | tuple[int, int]:
    """``value`` as an image size: a positive int (square side) or, unless ``square_only`` (the reason,
    quoted in the error), a ``(height, width)`` pair of positive ints as timm takes it (an equal pair
    is one side where only squares are allowed).

    Raises:
        ValueError: one line naming ``key``, what is allowed and an example.
    """
    pair = isinstance(value, Sequence) and not isinstance(value, str)
    sides = list(value) if pair else [value]
    if (len(sides) != (2 if pair else 1) or not all(isinstance(v, int) and not isinstance(v, bool) for v in sides)
            or min(sides) <= 0):
        allowed = "a positive side in pixels" + ("" if square_only else " or [height, width] of positive ints")
        example = f"e.g. {key}=32" + ("" if square_only else f" or {key}=[16,24]")
        raise ValueError(f"{key}={sides if pair else repr(value)} is not {allowed}: {example}")
    if pair and square_only and sides[0] != sides[1]:
        raise ValueError(f"{key}={sides}: {square_only}; give one side in pixels, e.g. {key}={min(sides)}")
    if pair and not square_only:
        return sides[0], sides[1]
    return sides[0]


def build_transform(
    img_size: int | tuple[int, int],
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Mapping[str, Any] | None = None,
):
    """A PIL -> ``(C, H, W)`` float tensor transform.

    Args:
        img_size: output side in pixels, or ``(H, W)`` (see :func:`check_img_size`).
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
