"""How masked attention is computed. Same math, different cost.

All functions take ``q, k, v`` of shape ``(B, H, L, d)`` and a boolean ``mask`` of shape ``(H, L, L)``
(True = attend; ``None`` = dense) and return ``(B, H, L, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """``-inf`` semantics through :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean
    mask (masked entries are excluded from the softmax). Fused kernel; the default backend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def zero_score(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """The authors' reference semantics: ``softmax((q k^T * scale) * mask) v``. Masked entries score
    0 and still take part in the softmax, so this is *not* sparse; offered to reproduce their numbers."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores * mask.to(scores.dtype)
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def math_neg_inf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit ``-inf``-masked softmax attention: the readable reference the fused backends are
    tested against (in float64)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


BACKENDS = {"sdpa": sdpa, "zero_score": zero_score, "math": math_neg_inf}
