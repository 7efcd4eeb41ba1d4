"""The Triton offset backend against the dense-mask path, on the CPU through Triton's interpreter.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the module fixture
sets ``TRITON_INTERPRET=1`` only while it loads :mod:`fibo.attention.backends.triton_kernels`
(restoring the variable after; the loaded kernels stay interpreted for the process). Small shapes
only (the interpreter runs each block op in NumPy): B=1-2, H=1-3, N from 17 to 33 (one at 384), d=16
(and the ViTs' 32, 64).
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


CASES = [  # (pattern, options, N, H, depth, B): every offset pattern, odd and even N, B=1, H=1
    ("fibottention", {}, 17, 3, 1, 2),                   # per-layer head permutation (depth 1)
    ("fibottention", {"modified": True}, 33, 3, 0, 1),   # offset 0 and a duplicate offset in head 1
    ("fibottention", {}, 24, 1, 2, 1),                   # H=1, B=1, even N
    ("longformer", {"window": 3}, 17, 2, 0, 1),
    ("longformer", {"window": 2}, 20, 1, 0, 2),          # H=1, even N
    ("dilated", {"dilation": 3, "window": 12}, 33, 2, 0, 2),
    ("sparse_transformer", {}, 25, 2, 0, 1),             # strided: |q - k| < 5 or a multiple of 5
    ("sparse_transformer", {"stride": 4}, 18, 1, 0, 1),  # H=1, B=1, even N
]


def _case_id(c):
    return f"{c[0]}{'-mod' if c[1].get('modified') else ''}-N{c[2]}-H{c[3]}-B{c[5]}"


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
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


HALF_TOL = {torch.bfloat16: dict(atol=6e-2, rtol=2e-2), torch.float16: dict(atol=8e-3, rtol=4e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern,options,cls_token", [("fibottention", {}, True), ("longformer", {"window": 2}, False),
                                                       ("sparse_transformer", {"stride": 3}, True)],
                         ids=["fibottention-cls", "longformer-nocls", "strided-cls"])
def test_half_precision(kernels, dtype, pattern, options, cls_token):
    # fp32 accumulation: only the rounding of inputs, outputs and gradients to the half type remains
    check(PATTERNS[pattern](**options).layout(17, 2, 0, cls_token), 1, dtype=dtype, **HALF_TOL[dtype])


@pytest.mark.parametrize("d", [32, 64])
def test_head_dims_of_vits(kernels, d):
    # ViT-S/B use d=64, the small ViTs d=32: one 64-row block, d is the whole tile width
    check(PATTERNS["fibottention"]().layout(21, 2, 1, True), 1, d=d)
    check(PATTERNS["dilated"](dilation=2, window=6).layout(21, 2, 0, True), 1, d=d, dtype=torch.bfloat16,
          **HALF_TOL[torch.bfloat16])


def test_head_dim_above_limit_is_one_clear_line(kernels):
    layout = PATTERNS["longformer"]().layout(9, 1, 0, True)
    q = torch.zeros(1, 1, 10, triton_offsets.MAX_HEAD_DIM + 16)
    with pytest.raises(ValueError, match=r"^the triton kernel takes head dims 1\.\.256, got d=272; use attention.backend=auto$"):
        offset_attention(q, q, q, OffsetPlan.from_layout(layout))
    call = AttentionCall(torch.device("cpu"), torch.float32, 196, offset_pattern=True, head_dim=512)
    with pytest.raises(ValueError, match=r"^attention.backend=triton cannot run this call: the triton kernel takes head "
                                         r"dims up to 256, got 512; use attention.backend=auto$"):
        choose_backend("triton", call)


def test_memory_is_linear_in_n(kernels):
    # no N x N tensor and no gathered K/V copy: the largest tensor allocated in forward + backward is
    # one (B, H, L, d) tensor (the output / dq / dk / dv), at N=384 where a bool N x N mask is 6x that
    from torch.profiler import ProfilerActivity, profile

    n, d = 384, 16
    layout = PATTERNS["longformer"](window=1).layout(n, 1, 0, True)
    plan = OffsetPlan.from_layout(layout)
    assert sum(t.numel() * t.element_size() for t in (plan.offsets, plan.counts, plan.diag)) < 2 * n
    q, k, v = qkv(1, 1, n + 1, d)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        offset_attention(q, k, v, plan).backward(torch.ones(1, 1, n + 1, d))
    largest = max(e.cpu_memory_usage for e in prof.events() if not e.cpu_children)
    assert largest == (n + 1) * d * 4 < n * n


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

    def auto(n, offset=True, dense=False, dropout=0.0, dtype=torch.bfloat16, d=64):
        return choose_backend("auto", AttentionCall(cuda, dtype, n, dropout, dense, True, offset, d)).name

    assert auto(196, dense=True) == "sdpa"  # no mask: the flash kernel
    assert auto(196) == auto(12544) == auto(196, dtype=torch.float32) == auto(196, d=0) == "triton"
    assert auto(196, offset=False) == "sdpa" and auto(3136, offset=False) == "flex"  # bigbird, random
    assert auto(196, dropout=0.1) == "sdpa" and auto(3136, dropout=0.1) == "sdpa"  # neither kernel has dropout
    # where the kernel cannot run, the table's next choice: masked SDPA for small N, flex for large N
    assert auto(196, dtype=torch.float64) == "sdpa" and auto(3136, dtype=torch.float64) == "flex"
    assert auto(196, d=512) == "sdpa"
    # the CPU never takes it, even with the interpreter on
    cpu = AttentionCall(torch.device("cpu"), torch.float32, 196, offset_pattern=True)
    assert not backends.TRITON.preferred(cpu) and not backends.FLEX.preferred(cpu)
    assert backends.TRITON not in backends.auto_candidates(cpu) and "triton" in backends.BACKEND_CHOICES
    assert backends.CUDA_AUTO_RULE_SOURCE.startswith("provisional")


def test_cuda_rule_is_the_table(monkeypatch):
    # the CUDA choice is read off CUDA_AUTO_RULE: the most specific key wins, the last step <= N
    monkeypatch.setitem(triton_offsets._SELF_TEST, "cuda", None)
    rule = {("offset", "*", "*"): ((1, ("sdpa",)),),
            ("offset", "bfloat16", "*"): ((1, ("flex", "sdpa")), (785, ("triton", "flex"))),
            ("offset", "bfloat16", 32): ((1, ("triton",)),)}
    monkeypatch.setattr(backends, "CUDA_AUTO_RULE", rule)
    cuda = torch.device("cuda")

    def auto(n, dtype=torch.bfloat16, d=64, offset=True):
        return choose_backend("auto", AttentionCall(cuda, dtype, n, 0.0, False, True, offset, d)).name

    assert [auto(196), auto(784), auto(785), auto(12544)] == ["flex", "flex", "triton", "triton"]
    assert auto(196, d=32) == "triton" and auto(196, dtype=torch.float32) == "sdpa"
    assert auto(196, offset=False) == "sdpa"  # no "mask" key: sdpa, which runs everything
    assert backends.cuda_ranking(AttentionCall(cuda, torch.bfloat16, 900, offset_pattern=True, head_dim=64)) == ("triton", "flex")
    # the CPU rule does not read the table
    cpu = AttentionCall(torch.device("cpu"), torch.bfloat16, 196, offset_pattern=True, head_dim=32)
    assert choose_backend("auto", cpu).name == "sdpa"
