"""The multi-head self-attention module used by every fibo model.

A drop-in for :class:`timm.layers.Attention` (same constructor keywords, same parameter names
``qkv`` and ``proj``, so timm ViT weights load) whose pattern comes from an :class:`AttentionSpec`.
The module owns the only cache: the pattern's layout per N, and what backends prepare from it (masks,
index tables, block masks) per (kind, N, device); nothing is built per step. The backend of each
call is :func:`fibo.attention.backends.choose_backend`'s choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fibo.attention.backends import AttentionCall, Backend, choose_backend
from fibo.attention.patterns.base import Layout, OffsetPattern
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

    Raises:
        ValueError: bad sizes or config; at the first forward, an explicit ``attention.backend`` that
            cannot run the call (e.g. ``flex`` while training on the CPU), naming the fix.
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
        self._cache: dict[tuple, Any] = {}

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.spec.options.items())
        return f"heads={self.num_heads}, pattern={self.spec.name}({opts}), layer_index={self.layer_index}, semantics={self.spec.mask_semantics}"

    # ------------------------------------------------------------------ the cache

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for this module. Keys: ``("layout", N)``, ``("mask", N, device)``,
        ``("table", N)``, ``("block_mask", N, device)``."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def layout(self, num_patch_tokens: int) -> Layout:
        """This layer's pattern at N patch tokens (cached): offsets, mask, table, mask_mod, density."""
        return self.cached(("layout", num_patch_tokens), lambda: self.spec.pattern.layout(
            num_patch_tokens, self.num_heads, self.layer_index, cls_token=self.num_prefix_tokens == 1))

    def get_mask(self, num_patch_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Boolean ``(H, L, L)`` mask (True = attend) for ``N = num_patch_tokens`` on ``device`` (cached),
        or None if dense."""
        if self.spec.is_dense:
            return None
        device = torch.device(device)
        return self.cached(("mask", num_patch_tokens, device), lambda: self.layout(num_patch_tokens).mask().to(device))

    # ------------------------------------------------------------------ what the pattern costs

    def density(self, num_patch_tokens: int) -> dict[str, float]:
        """``density`` (whole L x L matrix) and ``density_patch`` (N x N block) of the pattern used.
        Offset patterns count in closed form (O(H |O|)): no mask or table is built."""
        return self.layout(num_patch_tokens).density()

    def attention_flops(self, num_patch_tokens: int) -> dict[str, int]:
        """Attention FLOPs of one forward pass of one sample (not the qkv/proj linears).

        Convention: two matrix products, ``Q K^T`` and ``P V``, each ``head_dim`` multiply-adds per
        computed (query, key) entry, a multiply-add counted as 2 FLOPs:
        ``flops = entries * head_dim * 2 * 2``. ``entries`` = allowed (query, key) pairs summed over
        heads (the pattern's count: what the sparse kernels compute); ``zero_score`` semantics gives
        every entry a probability, so it counts all ``H * L^2``. Softmax, scaling and masking are not
        counted. ``*_dense``: the same for dense attention, ``entries_dense = H * L^2``.

        Returns:
            ``{"entries", "entries_dense", "flops", "flops_dense"}`` (integers).
        """
        layout = self.layout(num_patch_tokens)
        dense = self.num_heads * layout.seq_len**2
        entries = dense if self.spec.mask_semantics == "zero_score" else layout.nnz
        per_entry = self.head_dim * 2 * 2
        return {"entries": entries, "entries_dense": dense, "flops": entries * per_entry, "flops_dense": dense * per_entry}

    # ------------------------------------------------------------------ forward

    def backend_for(self, num_patch_tokens: int, device: torch.device, dtype: torch.dtype, requires_grad: bool) -> Backend:
        """The backend a forward with these inputs uses (:func:`~fibo.attention.backends.choose_backend`)."""
        call = AttentionCall(device, dtype, num_patch_tokens, self.attn_drop if self.training else 0.0,
                             self.spec.is_dense, requires_grad, isinstance(self.spec.pattern, OffsetPattern), self.head_dim)
        return choose_backend(self.spec.backend, call, self.spec.mask_semantics)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("fibo Attention builds its own mask; attn_mask/is_causal are not supported")
        B, L, C = x.shape
        n = L - self.num_prefix_tokens
        if n < 1:
            raise ValueError(f"attention needs at least one patch token, got sequence length {L}")
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, L, d)
        dropout_p = self.attn_drop if self.training else 0.0
        backend = self.backend_for(n, x.device, q.dtype, torch.is_grad_enabled() and q.requires_grad)
        out = backend.forward(q, k, v, backend.prepare(self, n, x.device), dropout_p)
        out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))
