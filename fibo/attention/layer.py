"""The multi-head self-attention module used by every fibo model.

A drop-in for :class:`timm.layers.Attention` (same constructor keywords, same parameter names
``qkv`` and ``proj``, so timm ViT weights load) whose pattern comes from an :class:`AttentionSpec`.
Masks are built once per (number of tokens, device) and cached on the module, never per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fibo.attention.backends import sdpa, zero_score
from fibo.attention.patterns import mask_density
from fibo.attention.spec import AttentionSpec


class Attention(nn.Module):
    """Multi-head self-attention with a per-layer sparse pattern.

    Args:
        dim: token width C.
        num_heads: H; ``dim`` must be divisible by it.
        qkv_bias, proj_bias, attn_drop, proj_drop: as in timm.
        attention: the pattern (an :class:`AttentionSpec` or its config mapping); ``None`` = dense.
        layer_index: the block index ("depth" of the paper's per-layer head permutation).
        num_prefix_tokens: tokens before the patch tokens (1 = CLS, whose row/column are dense; 0 for
            sequences without CLS, e.g. TimeSformer's temporal attention).
        **timm_kwargs: accepted for drop-in compatibility with timm blocks (``qk_norm`` and
            ``scale_norm`` must be falsy).

    Shapes: ``forward(x)`` takes ``(B, L, C)`` with ``L = num_prefix_tokens + N`` and returns ``(B, L, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attention: AttentionSpec | Mapping[str, Any] | None = None,
        layer_index: int = 0,
        num_prefix_tokens: int = 1,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        if timm_kwargs.get("qk_norm") or timm_kwargs.get("scale_norm"):
            raise ValueError("fibo.attention.Attention does not implement qk_norm/scale_norm")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 or 1 (CLS), got {num_prefix_tokens}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.spec = AttentionSpec.parse(attention)
        self.layer_index = layer_index
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.spec.options.items())
        return f"heads={self.num_heads}, pattern={self.spec.name}({opts}), layer_index={self.layer_index}, semantics={self.spec.mask_semantics}"

    def get_mask(self, num_patch_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Boolean ``(H, L, L)`` mask for ``N = num_patch_tokens`` on ``device`` (cached), or None if dense."""
        if self.spec.is_dense:
            return None
        device = torch.device(device)
        key = (num_patch_tokens, device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self.spec.mask(num_patch_tokens, self.num_heads, self.layer_index, cls_token=self.num_prefix_tokens == 1)
            mask = mask.to(device)
            self._masks[key] = mask
        return mask

    def density(self, num_patch_tokens: int) -> dict[str, float]:
        """``density`` (whole L x L matrix) and ``density_patch`` (N x N block) actually used."""
        mask = self.get_mask(num_patch_tokens)
        if mask is None:
            return {"density": 1.0, "density_patch": 1.0}
        return mask_density(mask, cls_token=self.num_prefix_tokens == 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("fibo Attention builds its own mask; attn_mask/is_causal are not supported")
        B, L, C = x.shape
        n = L - self.num_prefix_tokens
        if n < 1:
            raise ValueError(f"attention needs at least one patch token, got sequence length {L}")
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, L, d)
        mask = self.get_mask(n, x.device)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.spec.mask_semantics == "zero_score":
            out = zero_score(q, k, v, mask, dropout_p)
        else:
            out = sdpa(q, k, v, mask, dropout_p)
        out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))
