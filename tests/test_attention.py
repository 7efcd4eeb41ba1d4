"""The attention module against an explicit float64 -inf-masked softmax, and the reference
code's zero-score semantics against its formula."""

import copy

import pytest
import torch

from fibo.attention import Attention, AttentionSpec
from fibo.attention.backends import math_neg_inf

CONFIGS = [
    {"name": "dense"},
    {"name": "fibottention"},
    {"name": "fibottention", "modified": True},
    {"name": "fibottention", "w_min": 3, "w_max": 9, "permute_heads_per_layer": False},
]


def reference_forward(layer: Attention, x: torch.Tensor, semantics: str = "neg_inf") -> torch.Tensor:
    """Float64 re-implementation from the module's own weights (not its code path)."""
    B, L, C = x.shape
    H, d = layer.num_heads, layer.head_dim
    w_qkv, b_qkv = layer.qkv.weight.double(), layer.qkv.bias.double()
    qkv = (x.double() @ w_qkv.T + b_qkv).reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    mask = layer.spec.mask(L - layer.num_prefix_tokens, H, layer.layer_index, cls_token=layer.num_prefix_tokens == 1)
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    if mask is not None:
        if semantics == "neg_inf":
            scores = scores.masked_fill(~mask, float("-inf"))
        else:  # the authors' code: attn = attn * mask before softmax
            scores = scores * mask.double()
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    return out @ layer.proj.weight.double().T + layer.proj.bias.double()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("prefix", [1, 0], ids=["cls", "nocls"])
def test_forward_and_gradients_match_float64_reference(config, prefix):
    torch.manual_seed(0)
    layer = Attention(48, num_heads=3, qkv_bias=True, attention=config, layer_index=2, num_prefix_tokens=prefix)
    x = torch.randn(2, prefix + 37, 48, requires_grad=True)
    out = layer(x)
    layer64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    ref = reference_forward(layer64, x64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-4)
    ref_params = dict(layer64.named_parameters())
    for name, p in layer.named_parameters():
        scale = ref_params[name].grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), ref_params[name].grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_masked_entries_have_no_influence():
    """-inf semantics: changing a key/value the query may not attend leaves its output unchanged."""
    torch.manual_seed(0)
    layer = Attention(24, num_heads=3, attention={"name": "fibottention", "permute_heads_per_layer": False}, num_prefix_tokens=1)
    q = torch.randn(1, 3, 21, 8)
    k, v = torch.randn_like(q), torch.randn_like(q)
    mask = layer.get_mask(20)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    k2, v2 = k.clone(), v.clone()
    blocked = (~mask[1, 11]).nonzero().flatten()  # keys head 1 / patch token 10 may not see
    assert len(blocked) > 0
    k2[:, 1, blocked] += 5.0
    v2[:, 1, blocked] += 5.0
    out2 = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    torch.testing.assert_close(out[0, 1, 11], out2[0, 1, 11])
    # an entry it may attend does change its output
    k3 = k.clone()
    k3[:, 1, 0] += 5.0  # CLS key: always visible
    out3 = torch.nn.functional.scaled_dot_product_attention(q, k3, v, attn_mask=mask)
    assert (out3[0, 1, 11] - out[0, 1, 11]).abs().max() > 1e-4


def test_zero_score_semantics_equal_reference_formula():
    torch.manual_seed(1)
    cfg = {"name": "fibottention", "mask_semantics": "zero_score"}
    layer = Attention(48, num_heads=6, attention=cfg, qkv_bias=True, layer_index=1)
    x = torch.randn(3, 1 + 30, 48)
    out = layer(x)
    torch.testing.assert_close(out.double(), reference_forward(layer, x, semantics="zero_score"), atol=2e-5, rtol=1e-4)
    # and it differs from the sparse (-inf) semantics: masked entries still enter the softmax
    sparse = Attention(48, num_heads=6, attention={"name": "fibottention"}, qkv_bias=True, layer_index=1)
    sparse.load_state_dict(layer.state_dict())
    assert (sparse(x) - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend, built", [("sdpa", "mask"), ("sparse", "table")])
def test_mask_built_once_per_size_and_device(monkeypatch, backend, built):
    from fibo.attention.patterns.base import OffsetLayout

    layer = Attention(24, num_heads=3, attention={"name": "fibottention", "backend": backend})
    calls = []
    original = getattr(OffsetLayout, built)

    def counting(self, *a, **k):
        calls.append(self.num_tokens)
        return original(self, *a, **k)

    monkeypatch.setattr(OffsetLayout, built, counting)
    for _ in range(3):
        layer(torch.randn(2, 17, 24))
    layer(torch.randn(2, 26, 24))
    assert calls == [16, 25], calls


def test_density_reports_mask_actually_used():
    layer = Attention(36, num_heads=12, attention={"name": "fibottention"}, layer_index=0)
    d = layer.density(196)
    assert d["density_patch"] == pytest.approx(0.01994, abs=5e-6)
    assert Attention(36, num_heads=12).density(196) == {"density": 1.0, "density_patch": 1.0}


def test_bad_attention_configs():
    with pytest.raises(ValueError, match=r"unknown attention pattern 'fibo'; choose one of \['dense', 'fibottention'\]"):
        AttentionSpec.parse({"name": "fibo"})
    with pytest.raises(ValueError, match=r"attention=fibottention has no option\(s\) \['window'\]"):
        AttentionSpec.parse({"name": "fibottention", "window": 3})
    with pytest.raises(ValueError, match="mask_semantics='zero' is not one of"):
        AttentionSpec.parse({"name": "fibottention", "mask_semantics": "zero"})
    with pytest.raises(ValueError, match=r"^attention.modified='maybe' must be true or false \(attention=fibottention\)$"):
        AttentionSpec.parse({"name": "fibottention", "modified": "maybe"})
    with pytest.raises(ValueError, match=r"^attention.w_min=2.7 must be an integer"):
        AttentionSpec.parse({"name": "fibottention", "w_min": 2.7})
    with pytest.raises(ValueError, match="width 50 is not divisible by num_heads=3"):
        Attention(50, num_heads=3)


def test_layer_reference_backend_matches_sdpa_with_dropout_off():
    torch.manual_seed(0)
    layers = {b: Attention(48, num_heads=3, attention={"name": "fibottention", "modified": True, "backend": b}, layer_index=4)
              for b in ("reference", "sdpa")}
    layers["reference"].load_state_dict(layers["sdpa"].state_dict())
    x = torch.randn(2, 1 + 40, 48)
    torch.testing.assert_close(layers["reference"](x), layers["sdpa"](x), atol=2e-6, rtol=1e-5)
    assert layers["reference"].backend_for(40, x.device, x.dtype, requires_grad=True).name == "reference"


def test_math_reference_backend_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 8, dtype=torch.float64) for _ in range(3))
    mask = AttentionSpec.parse({"name": "fibottention", "modified": True}).mask(20, 3, 4)
    ref = math_neg_inf(q, k, v, mask)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref)


@pytest.mark.parametrize("name, options", [
    ("fibottention", {}), ("fibottention", {"modified": True}), ("longformer", {"window": 3}),
    ("dilated", {}), ("sparse_transformer", {}), ("bigbird", {}), ("random", {}),
])
@pytest.mark.parametrize("prefix", [0, 1])
def test_density_without_a_mask_equals_the_mask_count(monkeypatch, name, options, prefix):
    """Offset patterns count their entries in closed form from the offsets, never from an (H, L, L) mask
    or a table; the numbers equal the mask's own count, CLS or not, in every layer."""
    from fibo.attention.patterns import mask_density

    for n, heads, depth in [(10, 1, 0), (49, 4, 1), (196, 6, 3)]:
        layer = Attention(heads * 4, num_heads=heads, attention={"name": name, **options}, layer_index=depth,
                          num_prefix_tokens=prefix)
        got = layer.density(n)
        if name not in ("bigbird", "random"):
            assert [key[0] for key in layer._cache] == ["layout"], "density built a mask or a table"
        want = mask_density(layer.spec.mask(n, heads, depth, cls_token=bool(prefix)), cls_token=bool(prefix))
        assert got["density"] == pytest.approx(want["density"], abs=1e-6)
        assert got["density_patch"] == pytest.approx(want["density_patch"], abs=1e-6)


def test_density_at_high_resolution_keeps_no_mask():
    """ViT-S at 1792 px (N=12544): before, asking the density cached a 1.9 GB mask per layer."""
    layer = Attention(384, num_heads=6, attention={"name": "fibottention"}, layer_index=2)
    d = layer.density(12544)
    assert [key[0] for key in layer._cache] == ["layout"]
    assert 0.0 < d["density_patch"] < d["density"] < 0.01


@pytest.mark.parametrize("config, prefix", [({"name": "fibottention"}, 1), ({"name": "fibottention", "modified": True}, 0),
                                            ({"name": "bigbird"}, 1), ({"name": "longformer", "window": 2}, 0)])
def test_attention_flops_count_the_entries_of_the_mask(config, prefix):
    """flops = entries x head_dim x 2 products x 2 (multiply-add); dense: H L^2 entries."""
    layer = Attention(48, num_heads=6, attention=config, layer_index=1, num_prefix_tokens=prefix)
    n = 49
    L = n + prefix
    got = layer.attention_flops(n)
    entries = int(layer.spec.mask(n, 6, 1, cls_token=bool(prefix)).sum())
    assert got == {"entries": entries, "entries_dense": 6 * L * L, "flops": entries * 8 * 4, "flops_dense": 6 * L * L * 8 * 4}
    assert Attention(48, num_heads=6).attention_flops(n)["flops"] == 6 * (n + 1) ** 2 * 8 * 4
    zero = Attention(48, num_heads=6, attention=config | {"mask_semantics": "zero_score"}, num_prefix_tokens=prefix)
    assert zero.attention_flops(n)["entries"] == 6 * L * L  # every entry enters the softmax


def test_flops_at_high_resolution_from_the_offsets():
    """N=12544 (ViT-S at 1792 px): counted from the offsets, equal to the index table's nnz."""
    layer = Attention(384, num_heads=6, attention={"name": "fibottention"}, layer_index=2)
    flops = layer.attention_flops(12544)
    assert flops["entries"] == layer.layout(12544).table().nnz
    assert flops["flops"] == flops["entries"] * 64 * 4 < 0.01 * flops["flops_dense"]
