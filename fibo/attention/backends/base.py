"""The Backend protocol: how one attention call is computed (same math, different cost).

A backend says whether it can run a call (:meth:`Backend.supports`: ``None`` or the reason it cannot,
with the fix), whether ``auto`` should pick it (:meth:`Backend.preferred`: measured preferences),
what it needs built once per size and device (:meth:`Backend.prepare`, cached on the Attention
module) and computes ``(B, H, L, d) -> (B, H, L, d)`` (:meth:`Backend.forward`). Modelled on NATTEN's
backends (each checks its inputs, the first that can run is taken, a reference backend for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["AttentionCall", "Backend"]


@dataclass(frozen=True)
class AttentionCall:
    """What a backend must run. ``num_tokens``: N patch tokens; ``dense``: the pattern has no mask;
    ``requires_grad``: a backward pass will follow (autograd on and the inputs require grad);
    ``offset_pattern``: the pattern is an offset (Toeplitz) pattern (the triton backend's input);
    ``head_dim``: d per head (0 = not given; the CUDA ``auto`` table and the triton kernel's limit read it)."""

    device: torch.device
    dtype: torch.dtype
    num_tokens: int
    dropout_p: float = 0.0
    dense: bool = False
    requires_grad: bool = False
    offset_pattern: bool = False
    head_dim: int = 0


class Backend:
    """One way to compute attention. Subclasses set :attr:`name` (the ``attention.backend`` value) and
    :attr:`semantics` (``neg_inf``: masked entries excluded; ``zero_score``: the reference code's
    scores * mask) and implement :meth:`forward` (and :meth:`supports`/:meth:`prepare` where needed).

    ``prepare(layer, num_tokens, device)`` receives the :class:`fibo.attention.Attention` module and
    builds what :meth:`forward` needs through ``layer.cached(key, build)`` or ``layer.get_mask``;
    the module owns the only cache.
    """

    name: ClassVar[str]
    semantics: ClassVar[str] = "neg_inf"

    def supports(self, call: AttentionCall) -> str | None:
        """``None`` when this backend can run ``call``, else the reason (with the fix) as one line."""
        return None

    def preferred(self, call: AttentionCall) -> bool:
        """Should ``auto`` take this backend for ``call`` (given it is supported)? Default: yes."""
        return True

    def prepare(self, layer: Any, num_tokens: int, device: torch.device) -> Any:
        """What :meth:`forward` needs for N tokens on ``device`` (default: the boolean mask or None)."""
        return layer.get_mask(num_tokens, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any, dropout_p: float = 0.0) -> torch.Tensor:
        """``q, k, v``: ``(B, H, L, d)``; returns ``(B, H, L, d)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
