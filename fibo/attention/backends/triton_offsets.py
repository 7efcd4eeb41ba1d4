"""The Triton backend for offset (Toeplitz) patterns: Fibottention, Longformer, dilated, strided.

``attention.backend=triton``: ``-inf`` attention on the allowed entries only, forward and backward,
fp32/fp16/bf16, on CUDA tensors (or CPU tensors through Triton's interpreter, ``TRITON_INTERPRET=1``
set before the kernels are loaded: slow, for tests). Pattern semantics are those of
:class:`~fibo.attention.patterns.base.OffsetLayout`, taken from it (so the per-layer head
permutation, duplicate / out-of-range offsets and the empty-row diagonal rule are the layout's):
:class:`OffsetPlan` turns the layout's per-head distances into signed offsets ``{+-o}`` and a
diagonal flag per row.

Structure (kernels in :mod:`fibo.attention.backends.triton_kernels`): one program per block of
``BLOCK_M`` consecutive patch queries of one (batch, head) loops over that head's signed offsets;
the keys of the block at offset ``s`` are the block shifted by ``s`` (contiguous loads, out-of-range
rows masked); FlashAttention-2 online softmax in fp32, the log-sum-exp saved for the backward. The
CLS key is added to every patch row before the offsets (offsets stay inside the patch block, so it
is never counted twice); the dense CLS row is a split-K pass combined by log-sum-exp. Backward:
``delta = rowsum(dO * O)``; dQ over query blocks (same offsets), dK/dV over key blocks (queries
``j - s``: the transposed pattern, still contiguous), plus the CLS row/column. No ``N x N`` tensor, no
gathered K/V copies: memory O(B H L d).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fibo.attention.backends.base import AttentionCall, Backend
from fibo.attention.patterns.base import OffsetLayout

__all__ = ["TritonOffsets", "OffsetPlan", "offset_attention", "load_kernels", "triton_available"]

#: Query (and key) rows per program; CLS passes use :data:`CLS_BLOCK` rows per step and
#: :data:`CLS_CHUNK` rows per program (split-K). Untuned: ``scripts/gpu_check.py`` measures them.
BLOCK_M = 64
CLS_BLOCK = 64
CLS_CHUNK = 1024
NUM_WARPS = 4
LOG2E = 1.4426950408889634
#: The largest head dim the kernels take (FlashAttention's limit; the (BLOCK_M, d) fp32 tiles of
#: q, k, v and the accumulator live in registers, and larger ones spill).
MAX_HEAD_DIM = 256

log = logging.getLogger(__name__)
#: device -> ``None`` (the kernels compiled and matched the math path there) or the failure, one line.
_SELF_TEST: dict[str, str | None] = {}


KERNELS_MODULE = "fibo.attention.backends.triton_kernels"


def load_kernels() -> Any:
    """The kernel module (imported on first use: Triton reads ``TRITON_INTERPRET`` when it decorates
    the kernels, so the interpreter is on for the process's kernels iff it was set at that moment).
    Raises ``ImportError`` without Triton."""
    return importlib.import_module(KERNELS_MODULE)


def interpreted_kernels() -> bool:
    """Can the kernels run on CPU tensors in this process? True when they were (or, with
    ``TRITON_INTERPRET=1`` set now, will be) loaded into Triton's interpreter."""
    mod = sys.modules.get(KERNELS_MODULE)
    if mod is not None:
        return bool(mod.INTERPRETED)
    return _interpreter_requested() and bool(load_kernels().INTERPRETED)


@functools.lru_cache(maxsize=None)
def triton_available() -> str | None:
    """``None`` when Triton imports, else the reason as one line."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"Triton does not import ({type(err).__name__}: {err})"
    return None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class OffsetPlan:
    """What the kernels need of an :class:`OffsetLayout`, on one device.

    ``offsets``: ``(H, max_off)`` int32, head ``h``'s signed offsets in its first ``counts[h]`` entries;
    ``counts``: ``(H,)`` int32; ``diag``: ``(H, N)`` int8, 1 where the entry at offset 0 is allowed
    (every row when 0 is a pattern offset, else the rows the empty-row rule gives their diagonal).
    """

    offsets: torch.Tensor
    counts: torch.Tensor
    diag: torch.Tensor
    num_heads: int
    num_tokens: int
    cls_token: bool

    @property
    def seq_len(self) -> int:
        return self.num_tokens + int(self.cls_token)

    @classmethod
    def from_layout(cls, layout: OffsetLayout, device: torch.device | str = "cpu") -> "OffsetPlan":
        """Raises ``ValueError`` when ``layout`` is not an offset layout (mask patterns have no offsets)."""
        if not isinstance(layout, OffsetLayout):
            raise ValueError(f"the triton backend runs offset patterns only, got {type(layout).__name__}; "
                             "use attention.backend=auto (flex or sdpa)")
        n, h = layout.num_tokens, layout.num_heads
        signed, diag = [], torch.zeros(h, n, dtype=torch.int8)
        for head, (dist, self_rows) in enumerate(zip(layout.distances, layout.self_rows)):
            s = {o for o in dist if o > 0}
            s |= {-o for o in s}
            if 0 in dist:
                diag[head] = 1
            elif self_rows.any():
                diag[head] = torch.from_numpy(self_rows.astype("int8"))
            if diag[head].any():
                s.add(0)
            signed.append(sorted(s))
        width = max(1, max(map(len, signed)))
        offsets = torch.zeros(h, width, dtype=torch.int32)
        for head, s in enumerate(signed):
            offsets[head, :len(s)] = torch.tensor(s, dtype=torch.int32)
        counts = torch.tensor([len(s) for s in signed], dtype=torch.int32)
        device = torch.device(device)
        return cls(offsets.to(device), counts.to(device), diag.to(device), h, n, layout.cls_token)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _d_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _like_blhd(t: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, H, L, d)`` tensor stored as ``(B, L, H, d)`` (the layer's reshape is then free)."""
    B, H, L, d = t.shape
    return torch.empty(B, L, H, d, dtype=t.dtype, device=t.device).transpose(1, 2)


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _forward(q, k, v, plan: OffsetPlan, scale: float):
    kern = load_kernels()
    B, H, L, D = q.shape
    N, c = plan.num_tokens, int(plan.cls_token)
    BD = _block_d(D)
    out = _like_blhd(q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    grid = (triton_cdiv(N, BLOCK_M), B * H)
    kern._patch_fwd[grid](q, k, v, out, lse, plan.offsets, plan.counts, plan.diag,
                          *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          H, N, L, plan.offsets.shape[1], qk_scale,
                          HAS_CLS=c, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BD, num_warps=NUM_WARPS)
    if c:
        nsplit = triton_cdiv(L, CLS_CHUNK)
        pm = torch.empty(B * H, nsplit, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * H, nsplit, BD, dtype=torch.float32, device=q.device)
        kern._cls_fwd_partial[(B * H, nsplit)](q, k, v, pm, pl, pacc, q.stride(0), q.stride(1), *_strides(k),
                                               *_strides(v), H, L, CLS_CHUNK, nsplit, qk_scale,
                                               D=D, BLOCK_N=CLS_BLOCK, BLOCK_D=BD, num_warps=NUM_WARPS)
        m = pm.amax(1, keepdim=True)  # the first chunk holds key 0: finite
        w = torch.exp2(pm - m)
        total = (pl * w).sum(1)
        row = (pacc * w[..., None]).sum(1)[:, :D] / total[:, None]
        out[:, :, 0] = row.view(B, H, D).to(out.dtype)
        lse[:, 0] = m[:, 0] + torch.log2(total)
    return out, lse


def _backward(do, q, k, v, out, lse, plan: OffsetPlan, scale: float):
    kern = load_kernels()
    B, H, L, D = q.shape
    N, c = plan.num_tokens, int(plan.cls_token)
    BD = _block_d(D)
    qk_scale = scale * LOG2E
    delta = torch.empty_like(lse)
    kern._bwd_delta[(triton_cdiv(L, BLOCK_M), B * H)](out, do, delta, *_strides(out), *_strides(do), H, L,
                                                      D=D, BLOCK_M=BLOCK_M, BLOCK_D=BD, num_warps=NUM_WARPS)
    dq, dk, dv = _like_blhd(q), _like_blhd(k), _like_blhd(v)
    grid = (triton_cdiv(N, BLOCK_M), B * H)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
              H, N, L, plan.offsets.shape[1], qk_scale, scale)
    kern._patch_bwd_dq[grid](q, k, v, do, dq, lse, delta, plan.offsets, plan.counts, plan.diag, *common,
                             HAS_CLS=c, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BD, num_warps=NUM_WARPS)
    kern._patch_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, plan.offsets, plan.counts, plan.diag, *common,
                               HAS_CLS=c, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BD, num_warps=NUM_WARPS)
    if c:
        nsplit = triton_cdiv(L, CLS_CHUNK)
        part = [torch.empty(B * H, nsplit, BD, dtype=torch.float32, device=q.device) for _ in range(3)]
        kern._cls_bwd_partial[(B * H, nsplit)](q, k, v, do, lse, delta, *part, *_strides(q), *_strides(k),
                                               *_strides(v), *_strides(do), H, L, CLS_CHUNK, nsplit, qk_scale,
                                               D=D, BLOCK_N=CLS_BLOCK, BLOCK_D=BD, num_warps=NUM_WARPS)
        pdq, pdk, pdv = (p.sum(1)[:, :D].view(B, H, D) for p in part)
        dq[:, :, 0] = (pdq * scale).to(dq.dtype)
        dk[:, :, 0] = (pdk * scale).to(dk.dtype)
        dv[:, :, 0] = pdv.to(dv.dtype)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _OffsetAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: OffsetPlan, scale: float):
        q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
        out, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_d_contiguous(grad_out), q, k, v, out, lse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def offset_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: OffsetPlan,
                     scale: float | None = None) -> torch.Tensor:
    """``-inf``-masked softmax attention of an offset pattern, computed on its allowed entries only.

    Args:
        q, k, v: ``(B, H, L, d)`` of one dtype (fp32/fp16/bf16) on the plan's device (CUDA, or the CPU
            under ``TRITON_INTERPRET=1``); any strides (the head dim is made contiguous if it is not).
        plan: :meth:`OffsetPlan.from_layout` of the pattern (``H`` and ``L`` must match).
        scale: score scale; ``None`` = ``d ** -0.5`` (as SDPA).

    Returns:
        ``(B, H, L, d)`` in the input dtype (stored as ``(B, L, H, d)``). Differentiable (first order).

    Raises:
        ValueError: shapes, dtypes, devices or a head dim above :data:`MAX_HEAD_DIM` that do not fit
            (one line naming the fix).
    """
    B, H, L, d = q.shape
    if (H, L) != (plan.num_heads, plan.seq_len):
        raise ValueError(f"the offset plan is for H={plan.num_heads}, L={plan.seq_len}; got q of shape {tuple(q.shape)}")
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype, got {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}, "
                         f"{q.dtype}/{k.dtype}/{v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton backend computes fp32/fp16/bf16, got {q.dtype}; use attention.backend=auto")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"the triton kernel takes head dims 1..{MAX_HEAD_DIM}, got d={d}; use attention.backend=auto")
    if q.device != plan.offsets.device:
        raise ValueError(f"the offset plan is on {plan.offsets.device}, q on {q.device}; build it with OffsetPlan.from_layout(layout, q.device)")
    scale = d ** -0.5 if scale is None else float(scale)
    return _OffsetAttention.apply(q, k, v, plan, scale)


def self_test(device: torch.device) -> str | None:
    """Compile and run the kernels once per CUDA device on a tiny call (N=9 with CLS, H=2, d=16, fp32,
    forward and backward) against the math path; ``None`` when they agree, else the reason (logged
    once). Lets ``auto`` fall back instead of failing a training run when the GPU stack cannot build
    the kernels."""
    key = str(device)
    if key not in _SELF_TEST:
        try:
            from fibo.attention.backends.sdpa import math_neg_inf

            layout = OffsetLayout([[1, 3], [2]], 9, True)
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, 10, 16, generator=g).to(device).requires_grad_(True) for _ in range(3))
            out = offset_attention(q, k, v, OffsetPlan.from_layout(layout, device))
            ref = math_neg_inf(q, k, v, layout.mask().to(device))
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
            err = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))
            _SELF_TEST[key] = None if err < 1e-3 else f"the triton kernel's self-test on {key} is off by {err:.1e}"
        except Exception as e:  # noqa: BLE001 - any failure means "do not use it here"
            text = str(e).strip()
            _SELF_TEST[key] = f"the triton kernel failed its self-test on {key} ({type(e).__name__}: {text.splitlines()[-1] if text else ''})"
        if _SELF_TEST[key]:
            log.warning("%s; attention falls back to flex/sdpa", _SELF_TEST[key])
    return _SELF_TEST[key]


class TritonOffsets(Backend):
    """The Triton offset kernel (``attention.backend=triton``): offset patterns, fp32/fp16/bf16, head
    dims up to :data:`MAX_HEAD_DIM`, no attention dropout, CUDA tensors (CPU tensors only under
    Triton's interpreter)."""

    name = "triton"

    def supports(self, call: AttentionCall) -> str | None:
        fix = "use attention.backend=auto"
        if call.dense:
            return "the dense pattern has no offsets to follow; " + fix
        if not call.offset_pattern:
            return "the triton kernel runs offset patterns only (fibottention, longformer, dilated, sparse_transformer); " + fix
        if call.device.type != "cuda" and call.device.type != "cpu":
            return f"the triton kernel runs on CUDA tensors, got {call.device}; " + fix
        reason = triton_available()
        if reason:
            return reason + "; " + fix
        if call.device.type == "cpu" and not interpreted_kernels():
            return ("the triton kernel runs on CUDA tensors, got cpu (only Triton's interpreter runs it on the CPU: "
                    "TRITON_INTERPRET=1 set before fibo first loads the kernel, slow, for tests); "
                    "use attention.backend=auto or sparse")
        if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the triton kernel computes in fp32/fp16/bf16, got {call.dtype}; " + fix
        if call.head_dim > MAX_HEAD_DIM:
            return f"the triton kernel takes head dims up to {MAX_HEAD_DIM}, got {call.head_dim}; " + fix
        if call.dropout_p > 0.0:
            return f"the triton kernel has no attention dropout (attn_drop={call.dropout_p}); set attn_drop=0 or " + fix
        if call.device.type == "cuda":
            reason = self_test(call.device)
            if reason:
                return reason + "; " + fix
        return None

    def preferred(self, call: AttentionCall) -> bool:
        # off CUDA never by auto (the interpreter is for tests); on CUDA the table
        # fibo.attention.backends.CUDA_AUTO_RULE decides
        return call.device.type == "cuda"

    def prepare(self, layer, num_tokens, device):
        return layer.cached(("offset_plan", num_tokens, device),
                            lambda: OffsetPlan.from_layout(layer.layout(num_tokens), device))

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return offset_attention(q, k, v, prepared)

