"""The FlexAttention backend (the GPU sparse path): the pattern's ``mask_mod`` and a block mask.

The ``mask_mod`` comes from the pattern's layout (:meth:`fibo.attention.patterns.base.Layout.mask_mod`:
offset patterns look up ``allowed[h, |q - kv|]``, ``H x (N + 1)`` bools, so nothing of size N x N
is stored). ``create_block_mask`` runs on the tensors' device (its default is ``cuda``).

On CUDA the attention call is ``torch.compile``-d (a fused Triton kernel that skips empty blocks);
on the CPU it runs eagerly and forward only: PyTorch 2.14's FlexAttention backward raises
``NotImplementedError`` on the CPU, so :meth:`Flex.supports` refuses CPU calls that need gradients
(CPU training uses :mod:`fibo.attention.backends.cpu_sparse`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fibo.attention.backends.base import AttentionCall, Backend
from fibo.attention.patterns.base import Layout

__all__ = ["Flex", "block_mask", "flex_attention", "COMPILED"]

def block_mask(layout: Layout, device: torch.device | str = "cpu", block_size: int = 128):
    """The :class:`~torch.nn.attention.flex_attention.BlockMask` of ``layout`` (``L = N + cls`` tokens),
    built on ``device``; ``.mask_mod`` is the exact per-entry pattern and ``.build_seconds`` the build
    wall time (s).

    Raises:
        ValueError: for the dense pattern; ImportError: without FlexAttention (PyTorch < 2.5).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    mask_mod = layout.mask_mod(device)
    L = layout.seq_len
    start = time.perf_counter()
    bm = create_block_mask(mask_mod, B=None, H=layout.num_heads, Q_LEN=L, KV_LEN=L, device=device, BLOCK_SIZE=block_size)
    bm.build_seconds = time.perf_counter() - start
    return bm


class _CompiledFlex:
    """``torch.compile(flex_attention)``, compiled once per process at the first call that asks for it:
    a compiled-kernel handle like :data:`fibo.attention.backends.cpu_sparse.KERNEL` (compiling per
    layer or per call would recompile)."""

    def __init__(self) -> None:
        self.fn: Any = None

    def get(self) -> Any:
        if self.fn is None:
            from torch.nn.attention.flex_attention import flex_attention as eager

            self.fn = torch.compile(eager, dynamic=False)
        return self.fn


COMPILED = _CompiledFlex()


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None = None,
                   compile: bool | None = None) -> torch.Tensor:
    """``-inf``-masked attention through :func:`torch.nn.attention.flex_attention.flex_attention`.

    Args:
        q, k, v: ``(B, H, L, d)`` on the block mask's device.
        block_mask: from :func:`block_mask` (same H and L).
        scale: ``None`` = ``d ** -0.5``.
        compile: call the ``torch.compile``-d kernel (:data:`COMPILED`; default: on CUDA only).

    Returns:
        ``(B, H, L, d)``.

    Raises:
        NotImplementedError: from PyTorch, when differentiating on the CPU.
    """
    from torch.nn.attention.flex_attention import flex_attention as eager

    compile = q.is_cuda if compile is None else compile
    return (COMPILED.get() if compile else eager)(q, k, v, block_mask=block_mask, scale=scale)


class Flex(Backend):
    """FlexAttention with the pattern's block mask (``attention.backend=flex``): CUDA (compiled), or
    the CPU for forward-only calls (eager); no attention dropout."""

    name = "flex"

    def supports(self, call: AttentionCall) -> str | None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return f"FlexAttention needs PyTorch >= 2.5 (this is {torch.__version__}); use attention.backend=auto"
        if call.dense:
            return "the dense pattern has no block mask; use attention.backend=auto"
        if call.dropout_p > 0.0:
            return f"FlexAttention here has no attention dropout (attn_drop={call.dropout_p}); set attn_drop=0 or use attention.backend=sdpa"
        if call.device.type == "cpu" and call.requires_grad:
            return ("FlexAttention has no backward on the CPU (PyTorch raises NotImplementedError); to train on the "
                    "CPU use attention.backend=sparse or auto (flex runs forward-only there, e.g. under torch.no_grad)")
        if call.device.type not in ("cpu", "cuda"):
            return f"FlexAttention runs on cuda or cpu, got {call.device}; use attention.backend=sdpa"
        return None

    def preferred(self, call: AttentionCall) -> bool:
        # off CUDA never by auto (no CPU backward; the CPU has the sparse kernel); on CUDA the
        # table fibo.attention.backends.CUDA_AUTO_RULE decides
        return call.device.type == "cuda"

    def prepare(self, layer, num_tokens, device):
        return layer.cached(("block_mask", num_tokens, device), lambda: block_mask(layer.layout(num_tokens), device))

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return flex_attention(q, k, v, prepared)
