"""Vision Transformer backbone with pluggable attention.

This *is* timm's :class:`timm.models.vision_transformer.VisionTransformer` (patch embedding,
position embedding, init, CLS pooling, head) with fibo's :class:`~fibo.attention.Attention` in every
block, so state-dict keys are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.{i}.attn.qkv.*``, ``head.*``, ...) and timm ViT weights load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from fibo.attention import Attention, AttentionSpec


class Block(TimmBlock):
    """timm's pre-norm block whose attention is fibo's, told its layer index (``depth``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: AttentionSpec | None = None,
        depth: int = 0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_prefix_tokens: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, depth=depth, **kwargs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop, attention=attention, layer_index=depth,
                              num_prefix_tokens=num_prefix_tokens)


def attention_spec(attention: AttentionSpec | Mapping[str, Any] | None) -> AttentionSpec:
    """The :class:`AttentionSpec` of a model's ``attention`` config (``None`` = dense).

    Raises:
        ValueError: the config has a ``temporal`` key (the temporal pattern of video models moved
            to ``model.temporal_attention``), or an unknown pattern or option.
    """
    if isinstance(attention, Mapping) and "temporal" in attention:
        raise ValueError(f"attention.temporal={attention['temporal']!r} is no longer an attention option: the temporal "
                         f"pattern of a video model is model.temporal_attention=dense|same (TimeSformer only)")
    return AttentionSpec.parse(attention)


def check_patch_grid(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Return the patch grid ``(H/p, W/p)`` of an ``img_size`` (side, or ``(H, W)``) in pixels.

    Raises:
        ValueError: one line naming the key: ``model.patch_size`` not a positive integer, an image
            side that is not positive, or an image side not divisible by the patch size (both numbers).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"model.patch_size={patch_size!r} must be a positive integer: the patch side in pixels, "
                         f"dividing the image size (e.g. 2 for 16 px images, 16 for 224 px)")
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in hw):
        raise ValueError(f"model.img_size={img_size!r} (data.img_size) must be a positive number of pixels "
                         f"(or [height, width])")
    for side in hw:
        if side % patch_size:
            raise ValueError(
                f"image size {side} is not divisible by patch size {patch_size}: choose an image size "
                f"that is a multiple of {patch_size} (e.g. {side - side % patch_size or patch_size}) "
                f"or a patch size that divides {side}"
            )
    return hw[0] // patch_size, hw[1] // patch_size


class VisionTransformer(TimmVisionTransformer):
    """ViT (Dosovitskiy et al. 2021) with CLS pooling and Fibottention or any other fibo pattern.

    Args:
        img_size: input side in pixels (int or (H, W)); must be divisible by ``patch_size``.
        patch_size: patch side in pixels.
        in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, ...: timm's.
        attention: the ``attention`` config (mapping or :class:`AttentionSpec`); ``None`` = dense.

    Shapes: ``forward(x)``: ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``;
    ``forward_features``: ``(B, 1 + N, embed_dim)`` with ``N = (H/p)(W/p)`` patch tokens.

    Raises:
        ValueError: bad image or patch size (:func:`check_patch_grid`); unknown attention pattern or
            option, or an ``attention.temporal`` key (:func:`attention_spec`).
    """

    modality = "image"  # the task family it serves (fibo.config_check.check_task_model)

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        attention: AttentionSpec | Mapping[str, Any] | None = None,
        global_pool: str = "token",
        **kwargs: Any,
    ) -> None:
        grid = check_patch_grid(img_size, patch_size)
        spec = attention_spec(attention)
        if global_pool != "token":
            raise ValueError("fibo's ViT pools the CLS token (global_pool='token'), as the paper does")
        super().__init__(img_size=img_size, patch_size=patch_size, global_pool=global_pool,
                         block_fn=partial(Block, attention=spec), **kwargs)
        self.attention_spec = spec
        self.num_patch_tokens = grid[0] * grid[1]

    def attention_density(self) -> dict[str, float]:
        """Mean over layers of the attention density actually used at this model's input size:
        ``density`` (whole (N+1)^2 matrix, CLS included) and ``density_patch`` (N x N block)."""
        per_layer = [blk.attn.density(self.num_patch_tokens) for blk in self.blocks]
        return {k: sum(d[k] for d in per_layer) / len(per_layer) for k in per_layer[0]}
