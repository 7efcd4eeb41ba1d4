"""The multi-head self-attention module used by every fibo model.

A drop-in for :class:`timm.layers.Attention` (same constructor keywords, same parameter names
``qkv`` and ``proj``, so timm ViT weights load) whose pattern comes from an :class:`AttentionSpec`.
Masks, index tables and block masks are built once per (number of tokens, device) and cached on the
module, never per step. ``attention.backend`` chooses how ``neg_inf`` attention is computed (dense
mask + SDPA, the fused sparse CPU kernel or FlexAttention; see
:func:`fibo.attention.backends.resolve_backend`); ``zero_score`` always takes its explicit path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fibo.attention.backends import resolve_backend, sdpa, zero_score
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
        self._tables: dict[Any, Any] = {}  # index tables (CPU) and flex block masks, per (kind, N, device)

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

    #: Up to this many mask entries (H * L^2) the sparse index table is derived from the cached dense
    #: mask (the one SDPA uses, 4 MiB of bools); beyond, Toeplitz patterns build it from their offsets
    #: in O(N |O|) without any N x N tensor.
    TABLE_FROM_MASK_MAX = 1 << 22

    def get_index_table(self, num_patch_tokens: int):
        """The sparse backend's :class:`~fibo.attention.sparse.IndexTable` for N patch tokens (cached)."""
        from fibo.attention.baselines import TOEPLITZ_OFFSETS
        from fibo.attention.sparse import index_table, table_from_mask

        key = ("table", num_patch_tokens)
        table = self._tables.get(key)
        if table is None:
            cls = self.num_prefix_tokens == 1
            if self.spec.name in TOEPLITZ_OFFSETS and self.num_heads * (num_patch_tokens + cls) ** 2 > self.TABLE_FROM_MASK_MAX:
                table = index_table(self.spec.name, self.spec.options, num_patch_tokens, self.num_heads, self.layer_index, cls)
            else:
                table = table_from_mask(self.get_mask(num_patch_tokens))
            self._tables[key] = table
        return table

    def get_block_mask(self, num_patch_tokens: int, device: torch.device | str):
        """FlexAttention block mask for N patch tokens on ``device`` (cached)."""
        from fibo.attention.flex import flex_block_mask

        device = torch.device(device)
        key = ("flex", num_patch_tokens, device)
        bm = self._tables.get(key)
        if bm is None:
            bm = flex_block_mask(self.spec.name, self.spec.options, num_patch_tokens, self.num_heads,
                                 self.layer_index, self.num_prefix_tokens == 1, device)
            self._tables[key] = bm
        return bm

    def density(self, num_patch_tokens: int) -> dict[str, float]:
        """``density`` (whole L x L matrix) and ``density_patch`` (N x N block) actually used.

        Offset (Toeplitz) patterns count the entries of their index table, which beyond
        :attr:`TABLE_FROM_MASK_MAX` mask entries is built from the offsets in O(N |O|): no (H, L, L)
        mask is built or cached (at N=12544, H=12 that mask is 1.9 GB per layer). Other patterns
        build their mask once for the count and do not keep it."""
        from fibo.attention.baselines import TOEPLITZ_OFFSETS

        if self.spec.is_dense:
            return {"density": 1.0, "density_patch": 1.0}
        cls = self.num_prefix_tokens == 1
        if self.spec.name not in TOEPLITZ_OFFSETS:
            mask = self._masks.get((num_patch_tokens, torch.device("cpu")))
            if mask is None:
                mask = self.spec.mask(num_patch_tokens, self.num_heads, self.layer_index, cls_token=cls)
            return mask_density(mask, cls_token=cls)
        table = self.get_index_table(num_patch_tokens)
        h, n, L = self.num_heads, num_patch_tokens, num_patch_tokens + cls
        patch_nnz = table.nnz - (h * (L + n) if cls else 0)  # the CLS row (L keys) and column (n rows)
        return {"density": table.nnz / (h * L * L), "density_patch": patch_nnz / (h * n * n)}

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
        if self.spec.mask_semantics == "zero_score":
            out = zero_score(q, k, v, self.get_mask(n, x.device), dropout_p)
        else:
            backend = resolve_backend(self.spec.backend, device=x.device, num_tokens=n, dtype=q.dtype,
                                      dropout_p=dropout_p, dense=self.spec.is_dense)
            if backend == "sparse":
                from fibo.attention.sparse import sparse_attention

                out = sparse_attention(q, k, v, self.get_index_table(n))
            elif backend == "flex":
                from fibo.attention.flex import flex_attention

                out = flex_attention(q, k, v, self.get_block_mask(n, x.device))
            else:
                out = sdpa(q, k, v, self.get_mask(n, x.device), dropout_p)
        out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))
