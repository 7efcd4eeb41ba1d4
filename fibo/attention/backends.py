"""How masked attention is computed. Same math, different cost.

The mask-based functions below take ``q, k, v`` of shape ``(B, H, L, d)`` and a boolean ``mask`` of shape ``(H, L, L)``
(True = attend; ``None`` = dense) and return ``(B, H, L, d)``. The truly sparse backends take the pattern in their own form:
:func:`fibo.attention.sparse.sparse_attention` (CPU, fused C++, an index table) and
:func:`fibo.attention.flex.flex_attention` (FlexAttention, a block mask); :func:`resolve_backend`
picks one per call from ``attention.backend``.
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


# ---------------------------------------------------------------------------------------------
# Backend choice (``attention.backend``). Same math on every backend; only the cost differs.

BACKEND_CHOICES = ("auto", "sdpa", "sparse", "flex")

#: ``auto`` on CUDA uses FlexAttention from this many patch tokens on (below, a 128-token block mask
#: has almost no empty blocks and SDPA with the boolean mask is at least as fast). Provisional until
#: ``scripts/gpu_check.py`` has been run on a GPU.
AUTO_GPU_MIN_TOKENS = 1024

#: ``auto`` on the CPU uses the fused sparse kernel at every N: measured on a 2-core x86 CPU
#: (H=12, d=64, fp32) it is faster than dense SDPA forward+backward from N=16 on; see
#: experiments/sparse_attention_benchmark.md.
AUTO_CPU_MIN_TOKENS = 1

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        import logging

        logging.getLogger("fibo.attention").warning(message)


def resolve_backend(requested: str, *, device: torch.device, num_tokens: int, dtype: torch.dtype,
                    dropout_p: float = 0.0, dense: bool = False) -> str:
    """The backend that computes a ``-inf``-semantics attention call: ``sdpa``, ``sparse`` or ``flex``.

    Rule (``requested="auto"``, the default):

    * a dense pattern, or attention dropout > 0 -> ``sdpa`` (neither sparse path implements dropout);
    * CPU, fp32/fp64, ``N >= AUTO_CPU_MIN_TOKENS`` and the C++ kernel builds -> ``sparse``;
    * CUDA and ``N >= AUTO_GPU_MIN_TOKENS`` -> ``flex``; anything else -> ``sdpa``.

    An explicit ``sparse`` falls back to ``flex`` off the CPU and to ``sdpa`` where the kernel cannot
    run (build failure, dtype, dropout), with one logged warning; ``flex`` and ``sdpa`` are used as
    asked (FlexAttention's backward raises ``NotImplementedError`` on the CPU).

    Args:
        requested: one of :data:`BACKEND_CHOICES`.
        device, dtype: of the q/k/v tensors. num_tokens: N patch tokens. dropout_p: attention dropout.
        dense: the pattern is dense (no mask).

    Raises:
        ValueError: ``requested`` not in :data:`BACKEND_CHOICES`.
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"attention.backend={requested!r} is not one of {list(BACKEND_CHOICES)}")
    if dense or requested == "sdpa":
        return "sdpa"
    if requested == "flex":
        return "flex"
    cpu_ok = device.type == "cpu" and dtype in (torch.float32, torch.float64) and dropout_p == 0.0
    if requested == "sparse":
        if device.type != "cpu":
            _warn_once("sparse-gpu", "attention.backend=sparse is the CPU kernel; using flex on " + str(device))
            return "flex"
        if not cpu_ok:
            _warn_once("sparse-cpu", f"attention.backend=sparse needs fp32/fp64 and no attention dropout "
                                     f"(got {dtype}, dropout {dropout_p}); using sdpa")
            return "sdpa"
    elif device.type == "cuda":  # auto
        return "flex" if num_tokens >= AUTO_GPU_MIN_TOKENS else "sdpa"
    elif not cpu_ok or num_tokens < AUTO_CPU_MIN_TOKENS:
        return "sdpa"
    from fibo.attention.sparse import extension_available

    return "sparse" if extension_available() else "sdpa"  # a failed build has logged its warning
