"""The Triton offset backend against the dense-mask path, on the CPU through Triton's interpreter.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the module fixture
sets ``TRITON_INTERPRET=1`` only while it loads :mod:`fibo.attention.backends.triton_kernels`
(restoring the variable after; the loaded kernels stay interpreted for the process). Small shapes
only (the interpreter runs each block op in NumPy): B=1-2, H=2-3, N in {17, 33}, d=16.
Also the ``auto`` rule on (simulated) CUDA calls and the one-line refusal on CPU without the
interpreter. Skipped, with the reason, where Triton does not import.
"""

from __future__ import annotations

import sys

import pytest
import torch

from fibo.attention import PATTERNS, Attention
from fibo.attention import backends
from fibo.attention.backends import AttentionCall, choose_backend, triton_offsets
from fibo.attention.backends.sdpa import math_neg_inf
from fibo.attention.backends.triton_offsets import OffsetPlan, offset_attention
from fibo.attention.patterns.base import OffsetLayout

_reason = triton_offsets.triton_available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"no Triton: {_reason}")

FP32 = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def kernels():
    """The kernels loaded into Triton's interpreter (or a skip if this process loaded them compiled)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    try:
        mod = triton_offsets.load_kernels()
    finally:
        mp.undo()
    if not mod.INTERPRETED:
        pytest.skip("the triton kernels were loaded compiled earlier in this process; run this file on its own")
    return mod


def qkv(B, H, L, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]


def check(layout, B, d=16, dtype=torch.float32, seed=0, **tol):
    """Forward and gradients of the kernel against the float64 math path on the layout's mask."""
    q, k, v = qkv(B, layout.num_heads, layout.seq_len, d, dtype, seed)
    out = offset_attention(q, k, v, OffsetPlan.from_layout(layout))
    assert out.dtype == dtype and out.shape == q.shape
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = math_neg_inf(*ref_in, layout.mask())
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, go)
    tol = tol or FP32
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [  # (pattern, options, N, H, depth, B)
    ("fibottention", {}, 17, 3, 1, 2),                   # per-layer head permutation (depth 1)
    ("fibottention", {"modified": True}, 33, 3, 0, 1),   # offset 0 and a duplicate offset in head 1
    ("longformer", {"window": 3}, 17, 2, 0, 1),
    ("dilated", {"dilation": 3, "window": 12}, 33, 2, 0, 2),
]


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{'-mod' if c[1].get('modified') else ''}-N{c[2]}" for c in CASES])
def test_parity_fp32(kernels, case, cls_token):
    name, options, N, H, depth, B = case
    check(PATTERNS[name](**options).layout(N, H, depth, cls_token), B)


def test_empty_rows_attend_themselves(kernels):
    # no CLS: offset 7 leaves rows 3..6 of N=10 without a key (they get their diagonal); offsets
    # [0, 1, 1, 2, 3, 5] have 0 (every diagonal, once); a head without offsets is all diagonal
    layout = OffsetLayout([[7], [0, 1, 1, 2, 3, 5], []], 10, cls_token=False)
    assert layout.self_rows[0].tolist() == [False] * 3 + [True] * 4 + [False] * 3
    plan = OffsetPlan.from_layout(layout)
    assert plan.counts.tolist() == [3, 9, 1]  # {+-7, 0}, {0, +-1, +-2, +-3, +-5}, {0}
    assert plan.diag[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0] and plan.diag[1].all() and plan.diag[2].all()
    check(layout, 2)


def test_split_cls_row_and_small_blocks(kernels, monkeypatch):
    # the CLS row as 3 chunks (combined by log-sum-exp) and query blocks smaller than N
    monkeypatch.setattr(triton_offsets, "CLS_CHUNK", 16)
    monkeypatch.setattr(triton_offsets, "CLS_BLOCK", 8)
    monkeypatch.setattr(triton_offsets, "BLOCK_M", 16)
    check(PATTERNS["fibottention"]().layout(33, 2, 2, True), 1, d=24)  # d not a power of two


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(kernels, dtype):
    # fp32 accumulation: only the rounding of inputs, outputs and gradients to the half type remains
    tol = dict(atol=6e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=8e-3, rtol=4e-3)
    check(PATTERNS["fibottention"]().layout(17, 2, 0, True), 1, dtype=dtype, **tol)


def test_layer_matches_sdpa_backend(kernels):
    # through the Attention module: q, k, v are strided views of the qkv projection
    torch.manual_seed(0)
    layer = Attention(32, num_heads=2, attention={"name": "fibottention", "backend": "triton"}, layer_index=3)
    ref = Attention(32, num_heads=2, attention={"name": "fibottention", "backend": "sdpa"}, layer_index=3)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 18, 32, requires_grad=True)
    assert layer.backend_for(17, x.device, x.dtype, True).name == "triton"
    out, expected = layer(x), ref(x)
    torch.testing.assert_close(out, expected, **FP32)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_ref, **FP32)


def test_mask_pattern_refused(kernels):
    with pytest.raises(ValueError, match="offset patterns only"):
        OffsetPlan.from_layout(PATTERNS["bigbird"]().layout(17, 2, 0, True))
    call = AttentionCall(torch.device("cpu"), torch.float32, 17, offset_pattern=False)
    with pytest.raises(ValueError, match="attention.backend=triton cannot run this call: the triton kernel runs offset patterns only"):
        choose_backend("triton", call)


def test_cpu_without_interpreter_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, triton_offsets.KERNELS_MODULE, raising=False)
    call = AttentionCall(torch.device("cpu"), torch.float32, 196, requires_grad=True, offset_pattern=True)
    with pytest.raises(ValueError) as err:
        choose_backend("triton", call)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("attention.backend=triton cannot run this call: the triton kernel runs on CUDA tensors, got cpu")
    assert "TRITON_INTERPRET=1" in msg and "attention.backend=auto" in msg


def test_auto_rule_on_cuda(monkeypatch):
    # simulated CUDA calls (no tensor is made): the kernel's self-test is taken as passed
    monkeypatch.setitem(triton_offsets._SELF_TEST, "cuda", None)
    cuda = torch.device("cuda")

    def auto(n, offset=True, dense=False, dropout=0.0, dtype=torch.bfloat16):
        return choose_backend("auto", AttentionCall(cuda, dtype, n, dropout, dense, True, offset)).name

    assert auto(196, dense=True) == "sdpa"  # no mask: the flash kernel
    assert auto(196) == auto(12544) == auto(196, dtype=torch.float32) == "triton"
    assert auto(196, offset=False) == "sdpa" and auto(3136, offset=False) == "flex"  # bigbird, random
    assert auto(196, dropout=0.1) == "sdpa" and auto(3136, dropout=0.1) == "sdpa"  # neither kernel has dropout
    assert auto(196, dtype=torch.float64) == "sdpa"
    # the CPU never takes it, even with the interpreter on
    cpu = AttentionCall(torch.device("cpu"), torch.float32, 196, offset_pattern=True)
    assert not backends.TRITON.preferred(cpu)
    assert backends.AUTO_ORDER[0] is backends.TRITON and "triton" in backends.BACKEND_CHOICES
