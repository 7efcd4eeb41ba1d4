"""The dense-mask backends: fused SDPA (dense or with the boolean mask), the readable reference math
path and the authors' zero-score semantics. Each takes the ``(H, L, L)`` boolean mask (``None`` =
dense) from :meth:`fibo.attention.Attention.get_mask`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fibo.attention.backends.base import Backend

__all__ = ["Sdpa", "Reference", "ZeroScore", "math_neg_inf", "zero_score"]


def math_neg_inf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit ``-inf``-masked softmax attention ``softmax(q k^T / sqrt(d) + mask) v``: the readable
    reference the fused backends are tested against (in float64). Shapes ``(B, H, L, d)``."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


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


class Sdpa(Backend):
    """:func:`torch.nn.functional.scaled_dot_product_attention`, dense or with the boolean mask
    (``-inf`` semantics). Runs everything: every device, dtype, dropout; the fallback of ``auto``."""

    name = "sdpa"

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared, dropout_p=dropout_p)


class Reference(Backend):
    """:func:`math_neg_inf`: the explicit scores/softmax path (``attention.backend=reference``), for
    tests and debugging; never chosen by ``auto``."""

    name = "reference"

    def preferred(self, call) -> bool:
        return False

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return math_neg_inf(q, k, v, prepared, dropout_p)


class ZeroScore(Backend):
    """:func:`zero_score`, the only backend of ``mask_semantics=zero_score``."""

    name = "zero_score"
    semantics = "zero_score"

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return zero_score(q, k, v, prepared, dropout_p)
