"""FlexAttention backend (the GPU sparse path): the pattern as a ``mask_mod`` and a block mask.

Toeplitz patterns (Fibottention, Longformer, dilated, Sparse Transformer) become a per-head lookup
table ``allowed[h, |q - kv|]`` (``H x (N + 1)`` bools) inside ``mask_mod``, so nothing of size
``N x N`` is stored; other patterns (BigBird, random) look their dense mask up. The CLS row and
column are dense; a patch row left without keys (only without CLS) attends itself, exactly as
:meth:`fibo.attention.spec.AttentionSpec.mask`. ``create_block_mask`` runs on the tensors' device
(its default is ``cuda``). Block masks are cached per (pattern, N, H, depth, CLS, device).

On CUDA the attention call is ``torch.compile``-d (fused Triton kernel that skips empty blocks); on
the CPU it runs eagerly, forward only: PyTorch 2.14's FlexAttention backward raises
``NotImplementedError`` on the CPU, so CPU training uses :mod:`fibo.attention.sparse`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from fibo.attention.baselines import TOEPLITZ_OFFSETS
from fibo.attention.sparse import _freeze

__all__ = ["flex_block_mask", "flex_attention"]


def _toeplitz_mask_mod(head_offsets: list[list[int]], n: int, cls_token: bool, device: torch.device):
    c = int(cls_token)
    lut = torch.zeros(len(head_offsets), n + 1, dtype=torch.bool)  # distance N (CLS row) never allowed
    for h, offs in enumerate(head_offsets):
        valid = sorted({o for o in offs if 0 <= o < n})
        if valid:
            lut[h, valid] = True
    # rows left without any patch key (possible only without CLS) attend themselves
    t = torch.arange(n)
    has_key = torch.zeros(len(head_offsets), n, dtype=torch.bool)
    for h, offs in enumerate(head_offsets):
        for o in {o for o in offs if 0 <= o < n}:
            has_key[h] |= (t - o >= 0) | (t + o < n)
    # with CLS every row has the CLS key; without, row t is empty when no offset reaches inside [0, N)
    empty = torch.zeros(len(head_offsets), n + 1, dtype=torch.bool) if c else ~has_key
    lut, empty = lut.to(device), empty.to(device)
    last = n + c - 1

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = q_idx.clamp(0, last), kv_idx.clamp(0, last)  # padded indices stay in range
        dist = (qi - ki).abs().clamp(max=n)
        if c:
            dist = torch.where((qi == 0) | (ki == 0), n, dist)
        ok = lut[h, dist] | (empty[h, qi] & (qi == ki))
        if c:
            ok = ok | (qi == 0) | (ki == 0)
        return ok

    return mask_mod


def _dense_mask_mod(mask: torch.Tensor):
    last = mask.shape[-1] - 1

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[h, q_idx.clamp(0, last), kv_idx.clamp(0, last)]

    return mask_mod


@lru_cache(maxsize=128)
def _block_mask_cached(name, options, num_tokens, num_heads, depth, cls_token, device, block_size):
    from torch.nn.attention.flex_attention import create_block_mask

    opts = dict(options)
    if name in TOEPLITZ_OFFSETS:
        offsets = TOEPLITZ_OFFSETS[name](num_tokens, num_heads, depth, **opts)
        mask_mod = _toeplitz_mask_mod(offsets, num_tokens, cls_token, device)
    else:
        from fibo.attention.spec import AttentionSpec

        mask = AttentionSpec(name=name, options=opts).mask(num_tokens, num_heads, depth, cls_token=cls_token)
        mask_mod = _dense_mask_mod(mask.to(device))
    L = num_tokens + int(cls_token)
    start = time.perf_counter()
    bm = create_block_mask(mask_mod, B=None, H=num_heads, Q_LEN=L, KV_LEN=L, device=device, BLOCK_SIZE=block_size)
    bm.build_seconds = time.perf_counter() - start
    return bm


def flex_block_mask(name: str, options: Mapping[str, Any], num_tokens: int, num_heads: int, depth: int = 0,
                    cls_token: bool = True, device: torch.device | str = "cpu", block_size: int = 128):
    """The (cached) :class:`~torch.nn.attention.flex_attention.BlockMask` of pattern ``name`` for
    ``L = N + cls`` tokens, built on ``device``; ``.mask_mod`` is the exact per-entry pattern.
    Its attribute ``build_seconds`` is the build wall time (s).

    Raises:
        ValueError: for the ``dense`` pattern; ImportError: without FlexAttention (PyTorch < 2.5).
    """
    if name == "dense":
        raise ValueError("the dense pattern has no block mask")
    return _block_mask_cached(name, _freeze(options), int(num_tokens), int(num_heads), int(depth), bool(cls_token),
                              torch.device(device), int(block_size))


_COMPILED: dict[str, Any] = {}


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None = None,
                   compile: bool | None = None) -> torch.Tensor:
    """``-inf``-masked attention through :func:`torch.nn.attention.flex_attention.flex_attention`.

    Args:
        q, k, v: ``(B, H, L, d)`` on the block mask's device.
        block_mask: from :func:`flex_block_mask` (same H and L).
        scale: ``None`` = ``d ** -0.5``.
        compile: ``torch.compile`` the call (default: on CUDA only).

    Returns:
        ``(B, H, L, d)``.

    Raises:
        NotImplementedError: from PyTorch, when differentiating on the CPU.
    """
    from torch.nn.attention.flex_attention import flex_attention as _flex

    compile = q.is_cuda if compile is None else compile
    fn = _flex
    if compile:
        fn = _COMPILED.get("flex")
        if fn is None:
            fn = _COMPILED["flex"] = torch.compile(_flex, dynamic=False)
    return fn(q, k, v, block_mask=block_mask, scale=scale)
