"""The truly sparse backends (fused CPU kernel, FlexAttention) against the dense-mask SDPA path.

Patterns: every golden case (N=196, H=3/6/12, plain and modified: duplicate offsets and offset 0),
with and without CLS, plus N not a multiple of any block size, B=1, H=1 and rows left empty.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fibo.attention import PATTERNS, Attention, AttentionSpec
from fibo.attention import backends
from fibo.attention.backends import cpu_sparse
from fibo.attention.backends.cpu_sparse import sparse_attention
from fibo.attention.patterns.base import OffsetLayout

FP32 = dict(atol=2e-5, rtol=1e-4)


def index_table(name, options, N, H, depth, cls_token):
    return PATTERNS[name](**options).layout(N, H, depth, cls_token).table()


def golden_specs(golden_cases):
    for case in golden_cases:
        yield case, {"name": "fibottention", "modified": case["modified"]}


def qkv(B, H, L, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


def parity(q, k, v, mask, table, **tol):
    """Forward and gradients of the sparse kernel against SDPA with the dense boolean mask."""
    out = sparse_attention(q, k, v, table)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "nocls"])
def test_golden_patterns_sparse_kernel_matches_sdpa(golden_cases, cls_token):
    for case, cfg in golden_specs(golden_cases):
        N, H = case["num_patch_tokens"], case["num_heads"]
        spec = AttentionSpec.parse(cfg)
        for depth in (0, 1):
            mask = spec.mask(N, H, depth, cls_token=cls_token)
            table = index_table("fibottention", spec.options, N, H, depth, cls_token)
            # the O(N|O|) table is the mask, entry for entry (duplicates once, offset 0 = self)
            assert torch.equal(table.to_mask(), mask), (case["num_heads"], case["modified"], depth)
            assert table.nnz == int(mask.sum())
            q, k, v = qkv(2, H, N + cls_token, 16, seed=depth)
            parity(q, k, v, mask, table, **FP32)


def test_golden_density_from_table(golden_cases):
    for case, cfg in golden_specs(golden_cases):
        N, H = case["num_patch_tokens"], case["num_heads"]
        opts = {k: v for k, v in cfg.items() if k != "name"}
        with_cls = index_table("fibottention", opts, N, H, 0, True)
        assert with_cls.density == pytest.approx(case["density_with_cls"], abs=5e-6)
        patch_only = index_table("fibottention", opts, N, H, 0, False)
        assert patch_only.density == pytest.approx(case["density_patch_only"], abs=5e-6)


def test_modified_head_with_offset_zero_and_duplicates():
    # offsets [0, 1, 1, 2, 3, 5]: token 10 attends 5, 7, 8, 9, 10 (itself once), 11, 12, 13, 15
    table = OffsetLayout([[0, 1, 1, 2, 3, 5]], 30, cls_token=True).table()
    row = table.cols[table.row_ptr[11]:table.row_ptr[12]].tolist()  # L-index 11 = patch 10
    assert row == [0, 6, 8, 9, 10, 11, 12, 13, 14, 16]
    assert table.cols[table.row_ptr[0]:table.row_ptr[1]].tolist() == list(range(31))  # CLS row dense


@pytest.mark.parametrize("N,H,B,cls_token", [(131, 1, 1, True), (131, 1, 1, False), (67, 5, 1, True), (200, 3, 3, False)])
def test_odd_sizes_single_head_single_batch(N, H, B, cls_token):
    spec = AttentionSpec.parse({"name": "fibottention", "modified": True})
    mask = spec.mask(N, H, 2, cls_token=cls_token)
    table = index_table("fibottention", spec.options, N, H, 2, cls_token)
    assert torch.equal(table.to_mask(), mask)
    parity(*qkv(B, H, N + cls_token, 24), mask, table, **FP32)


def test_rows_without_keys_attend_themselves():
    # N=10, H=3: head 3's only offset is 6, so patch tokens 4 and 5 reach nothing inside [0, 10)
    spec = AttentionSpec.parse({"name": "fibottention", "permute_heads_per_layer": False})
    mask = spec.mask(10, 3, 0, cls_token=False)
    table = index_table("fibottention", spec.options, 10, 3, 0, False)
    assert torch.equal(table.to_mask(), mask)
    assert table.to_mask()[2, 4].nonzero().flatten().tolist() == [4]
    assert table.to_mask()[2, 3].nonzero().flatten().tolist() == [9]
    parity(*qkv(2, 3, 10, 8, dtype=torch.float64), mask, table)


def test_float64_matches_to_rounding():
    spec = AttentionSpec.parse({"name": "fibottention"})
    mask = spec.mask(196, 12, 5)
    parity(*qkv(1, 12, 197, 64, dtype=torch.float64), mask, index_table("fibottention", {}, 196, 12, 5, True),
           atol=1e-12, rtol=1e-10)


def test_masked_keys_have_no_influence_and_strided_inputs():
    """Non-contiguous q/k/v (as the layer passes them) and a blocked key changes nothing."""
    table = index_table("fibottention", {}, 50, 4, 0, True)
    qkv_packed = torch.randn(2, 51, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d), strided
    q, k, v = qkv_packed.unbind(0)
    out = sparse_attention(q, k, v, table)
    blocked = (~table.to_mask()[1, 21]).nonzero().flatten()
    k2, v2 = k.clone(), v.clone()
    k2[:, 1, blocked] += 3.0
    v2[:, 1, blocked] -= 3.0
    out2 = sparse_attention(q, k2, v2, table)
    torch.testing.assert_close(out[:, 1, 21], out2[:, 1, 21])
    assert (out2 - out).abs().max() > 1e-3  # other rows do see those keys


def test_large_n_table_never_builds_a_dense_mask(monkeypatch):
    def no_mask(*a, **k):
        raise AssertionError("dense mask built on the O(N|O|) path")

    layer = Attention(48, num_heads=12, attention={"name": "fibottention", "backend": "sparse"}, layer_index=3)
    n = 1000  # 12 * 1001^2 mask entries > Attention.TABLE_FROM_MASK_MAX
    monkeypatch.setattr(OffsetLayout, "mask", no_mask)
    x = torch.randn(1, n + 1, 48)
    out = layer(x)
    table = backends.SPARSE.prepare(layer, n, torch.device("cpu"))
    assert table is backends.SPARSE.prepare(layer, n, torch.device("cpu"))  # cached on the layer
    monkeypatch.undo()
    ref_layer = Attention(48, num_heads=12, attention={"name": "fibottention", "backend": "sdpa"}, layer_index=3)
    ref_layer.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out, ref_layer(x), **FP32)
    # memory grows as N * |O|: a few dozen int32 per row, not N
    assert table.nbytes < 12 * (n + 1) * 8 * 40 + 4 * 12 * (n + 1)


@pytest.mark.parametrize("config", [{"name": "fibottention"}, {"name": "fibottention", "modified": True}])
@pytest.mark.parametrize("prefix", [1, 0])
def test_layer_backends_agree_forward_and_gradients(config, prefix):
    torch.manual_seed(0)
    layers = {b: Attention(64, num_heads=4, qkv_bias=True, attention=config | {"backend": b}, layer_index=1,
                           num_prefix_tokens=prefix) for b in ("sdpa", "sparse")}
    layers["sparse"].load_state_dict(layers["sdpa"].state_dict())
    x = torch.randn(3, prefix + 77, 64)
    outs, grads = {}, {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_(True)
        outs[b] = layer(xb)
        outs[b].square().sum().backward()
        grads[b] = [xb.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(outs["sparse"], outs["sdpa"], **FP32)
    for a, b in zip(grads["sparse"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)


def chosen(requested, *, device, num_tokens, dtype, semantics="neg_inf", **call):
    """The name of choose_backend's choice for a call with these inputs."""
    return backends.choose_backend(requested, backends.AttentionCall(torch.device(device), dtype, num_tokens, **call),
                                   semantics).name


def test_resolve_backend_is_gone():
    """choose_backend is the one way to ask; its name-returning twin was removed (#12)."""
    assert not hasattr(backends, "resolve_backend") and "resolve_backend" not in backends.__all__


def test_auto_rule():
    cpu, f32 = torch.device("cpu"), torch.float32
    assert chosen("auto", device=cpu, num_tokens=196, dtype=f32) == "sparse"
    assert chosen("auto", device=cpu, num_tokens=196, dtype=f32, dense=True) == "sdpa"
    assert chosen("auto", device=cpu, num_tokens=196, dtype=torch.bfloat16) == "sdpa"
    assert chosen("auto", device=cpu, num_tokens=196, dtype=f32, dropout_p=0.1) == "sdpa"
    assert chosen("auto", device=cpu, num_tokens=196, dtype=f32, requires_grad=True) == "sparse"
    cuda = torch.device("cuda")
    assert chosen("auto", device=cuda, num_tokens=196, dtype=f32) == "sdpa"
    assert chosen("auto", device=cuda, num_tokens=3136, dtype=f32) == "flex"
    assert chosen("auto", device=cuda, num_tokens=3136, dtype=f32, dropout_p=0.1) == "sdpa"
    assert chosen("flex", device=cpu, num_tokens=196, dtype=f32) == "flex"  # forward only
    assert chosen("sparse", device=cpu, num_tokens=196, dtype=f32, dense=True) == "sdpa"
    assert chosen("reference", device=cuda, num_tokens=196, dtype=f32) == "reference"
    with pytest.raises(ValueError, match=r"attention.backend='fast' is not one of \['auto', 'sdpa', 'sparse', 'flex', 'triton', 'reference'\]"):
        AttentionSpec.parse({"name": "fibottention", "backend": "fast"})


def test_explicit_backend_that_cannot_run_raises_one_line():
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    with pytest.raises(ValueError, match=r"^attention.backend=sparse cannot run this call: the fused kernel runs on the CPU "
                                         r"only, got cuda; use attention.backend=flex or auto$"):
        chosen("sparse", device=cuda, num_tokens=196, dtype=f32)
    with pytest.raises(ValueError, match=r"^attention.backend=sparse cannot run this call: the fused kernel computes in "
                                         r"float32/float64, got torch.bfloat16; use attention.backend=auto \(or sdpa\)$"):
        chosen("sparse", device=cpu, num_tokens=196, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^attention.backend=flex cannot run this call: FlexAttention has no backward on the "
                                         r"CPU \(PyTorch raises NotImplementedError\); to train on the CPU use "
                                         r"attention.backend=sparse or auto"):
        chosen("flex", device=cpu, num_tokens=196, dtype=f32, requires_grad=True)
    call = backends.AttentionCall(cpu, f32, 196)
    with pytest.raises(ValueError, match=r"^attention.backend=sparse cannot run this call: it computes "
                                         r"mask_semantics=neg_inf, not zero_score; use attention.backend=auto$"):
        backends.choose_backend("sparse", call, "zero_score")
    assert backends.choose_backend("auto", call, "zero_score") is backends.ZERO_SCORE


def test_flex_training_on_the_cpu_fails_at_the_first_forward():
    """Before: a NotImplementedError from inside torch's flex_attention; now one line at the first forward."""
    layer = Attention(32, num_heads=4, attention={"name": "fibottention", "backend": "flex"})
    x = torch.randn(2, 51, 32)
    with pytest.raises(ValueError, match=r"^attention.backend=flex cannot run this call: FlexAttention has no backward on the CPU"):
        layer(x)
    assert layer._cache == {}  # refused before anything was built
    with torch.no_grad():
        assert layer(x).shape == (2, 51, 32)  # forward-only use stays possible


def test_failed_build_falls_back_to_sdpa_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_sparse.KERNEL, "module", None)
    monkeypatch.setattr(cpu_sparse.KERNEL, "error", None)
    monkeypatch.setenv("FIBO_DISABLE_SPARSE_EXT", "1")
    layer = Attention(24, num_heads=3, attention={"name": "fibottention"})
    with caplog.at_level(logging.WARNING):
        assert chosen("auto", device=torch.device("cpu"), num_tokens=20, dtype=torch.float32) == "sdpa"
        out = layer(torch.randn(2, 21, 24))  # trains on: sdpa
    assert "falling back" in caplog.text or "using sdpa" in caplog.text
    assert out.shape == (2, 21, 24) and torch.isfinite(out).all()
    assert ("table", 20) not in layer._cache
    with pytest.raises(ValueError, match=r"^attention.backend=sparse cannot run this call: the C\+\+ kernel could not be "
                                         r"built \(RuntimeError: disabled by FIBO_DISABLE_SPARSE_EXT\); use attention.backend=auto"):
        Attention(24, num_heads=3, attention={"name": "fibottention", "backend": "sparse"})(torch.randn(2, 21, 24))


# ------------------------------------------------------------------ FlexAttention (CPU: forward only)

flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "nocls"])
def test_flex_mask_mod_is_the_mask_on_golden_patterns(golden_cases, cls_token):
    from fibo.attention.backends.flex import block_mask

    for case, cfg in golden_specs(golden_cases):
        N, H = case["num_patch_tokens"], case["num_heads"]
        spec = AttentionSpec.parse(cfg)
        bm = block_mask(spec.pattern.layout(N, H, 1, cls_token), "cpu")
        dense = flex.create_mask(bm.mask_mod, None, H, N + cls_token, N + cls_token, device="cpu")
        assert torch.equal(dense[0], spec.mask(N, H, 1, cls_token=cls_token))


@pytest.mark.parametrize("N,H,B,cls_token,modified", [(196, 12, 2, True, False), (196, 3, 1, False, True),
                                                      (131, 1, 1, True, True), (10, 3, 2, False, False)])
def test_flex_forward_matches_sdpa(N, H, B, cls_token, modified):
    from fibo.attention.backends.flex import block_mask, flex_attention

    opts = {"modified": modified, "permute_heads_per_layer": N != 10}
    spec = AttentionSpec.parse({"name": "fibottention", **opts})
    mask = spec.mask(N, H, 0, cls_token=cls_token)
    bm = block_mask(spec.pattern.layout(N, H, 0, cls_token), "cpu")
    q, k, v = (t.detach() for t in qkv(B, H, N + cls_token, 16))
    out = flex_attention(q, k, v, bm)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **FP32)


def test_layer_flex_backend_forward():
    torch.manual_seed(0)
    a = Attention(32, num_heads=4, attention={"name": "fibottention", "backend": "flex"}, layer_index=2)
    b = Attention(32, num_heads=4, attention={"name": "fibottention", "backend": "sdpa"}, layer_index=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1 + 150, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), **FP32)
    assert ("block_mask", 150, torch.device("cpu")) in a._cache
