"""The Fibottention pattern against the reference values and its documented edge cases."""

import random

import pytest
import torch

from fibo.attention import Attention, AttentionSpec
from fibo.attention.patterns import (
    Fibottention,
    fibottention_offsets,
    fibottention_windows,
    head_permutation,
    mask_density,
    wythoff_pair,
)


def fibottention_mask(num_tokens, num_heads, depth=0, cls_token=True, **options):
    return Fibottention(**options).mask(num_tokens, num_heads, depth, cls_token)


def test_wythoff_rows():
    assert [wythoff_pair(i) for i in range(1, 7)] == [(1, 2), (4, 7), (6, 10), (9, 15), (12, 20), (14, 23)]
    with pytest.raises(ValueError, match="1-based"):
        wythoff_pair(0)


def test_golden_offsets_windows_permutations_densities(golden_cases):
    assert len(golden_cases) == 6
    for case in golden_cases:
        n, h, modified = case["num_patch_tokens"], case["num_heads"], case["modified"]
        assert fibottention_windows(n, h, case["w_min"], case["w_max"]) == [x["window"] for x in case["heads"]]
        assert fibottention_offsets(n, h, w_min=case["w_min"], modified=modified) == [x["offsets"] for x in case["heads"]]
        for depth, perm in case["head_permutation_by_depth"].items():
            assert head_permutation(h, int(depth)) == perm
        for depth in range(3):  # density does not depend on the per-layer permutation
            dens = mask_density(fibottention_mask(n, h, depth=depth, modified=modified))
            assert dens["density_patch"] == pytest.approx(case["density_patch_only"], abs=5e-7)
            assert dens["density"] == pytest.approx(case["density_with_cls"], abs=5e-7)


def test_mask_follows_permuted_offsets(golden_cases):
    case = next(c for c in golden_cases if c["num_heads"] == 6 and not c["modified"])
    offsets = [x["offsets"] for x in case["heads"]]
    perm = case["head_permutation_by_depth"]["1"]
    mask = fibottention_mask(196, 6, depth=1)
    assert mask.shape == (6, 197, 197) and mask.dtype == torch.bool
    for head in range(6):
        row = mask[head, 1 + 100, 1:]  # patch token 100
        allowed = sorted(abs(k - 100) for k in row.nonzero().flatten().tolist())
        expected = sorted({o for o in offsets[perm[head]] if 100 - o >= 0} | {o for o in offsets[perm[head]] if 100 + o < 196})
        assert sorted(set(allowed)) == expected


def test_mask_properties():
    for modified in (False, True):
        mask = fibottention_mask(196, 12, depth=2, modified=modified)
        assert torch.equal(mask, mask.transpose(-1, -2)), "pattern must be symmetric (t+o and t-o)"
        assert mask[:, 0, :].all() and mask[:, :, 0].all(), "CLS row and column are dense"
        diag = mask[:, 1:, 1:].diagonal(dim1=-2, dim2=-1)
        # the default variant never attends itself; the modified one does (offset 0) in one head only
        assert diag.any(dim=-1).sum().item() == (1 if modified else 0)


def test_modified_duplicate_offsets_count_once():
    # head 1 of the modified variant: offsets [0, 1, 1, 2, 3, 5] -> distances {0,1,2,3,5}
    mask = fibottention_mask(50, 3, permute_heads_per_layer=False, modified=True, cls_token=False)
    head1 = mask[0]
    expected = sum(1 for q in range(50) for k in range(50) if abs(q - k) in {0, 1, 2, 3, 5})
    assert int(head1.sum()) == expected


def test_no_cls_shape_and_no_permutation():
    mask = fibottention_mask(20, 4, depth=5, cls_token=False, permute_heads_per_layer=False)
    assert mask.shape == (4, 20, 20)
    offsets = fibottention_offsets(20, 4)
    for head, offs in enumerate(offsets):
        assert mask[head, 10, 10 + offs[0]]


def test_single_head_gets_w_max():
    # H = 1: the single head gets the whole Fibonacci ladder up to w_max = N // 3 = 65
    assert fibottention_windows(196, 1) == [65]
    assert fibottention_offsets(196, 1) == [[1, 2, 3, 5, 8, 13, 21, 34, 55]]
    assert head_permutation(1, 7) == [0]


def test_small_n_raises_w_max_to_w_min_and_drops_out_of_range_offsets():
    # N = 9: w_max = 3 < w_min = 5 -> every window is 5
    assert fibottention_windows(9, 3) == [5, 5, 5]
    offs = fibottention_offsets(9, 3)
    assert offs == [[1, 2, 3, 5], [4], [6]]  # the reference keeps [a_i] even when a_i > w_i
    # N = 4: offset 5 >= N connects nothing; head 3's only offset (6) connects nothing at all, so
    # every row of head 3 is left empty and attends only itself (the empty-row rule, without CLS)
    layout = Fibottention(permute_heads_per_layer=False).layout(4, 3, cls_token=False)
    assert layout.distances[2] == [] and layout.self_rows[2].all()
    mask = layout.mask()
    assert torch.equal(mask[2], torch.eye(4, dtype=torch.bool))
    assert mask[0].sum() == sum(1 for q in range(4) for k in range(4) if abs(q - k) in {1, 2, 3})


def test_global_rng_untouched():
    random.seed(123)
    state = random.getstate()
    torch_state = torch.random.get_rng_state()
    head_permutation(12, 3)
    fibottention_mask(77, 12, depth=9)
    assert random.getstate() == state
    assert torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.parametrize("bad", [dict(num_tokens=0, num_heads=3), dict(num_tokens=10, num_heads=0)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        fibottention_offsets(**bad)


def test_shared_offsets_ablation_all_heads_equal(golden_cases):
    """shared_offsets=true (the paper's diversity ablation): every head of a layer uses head 0's offset
    set; with the per-layer permutation that set is head_permutation(H, depth)[0], without it set 0."""
    case = next(c for c in golden_cases if c["num_heads"] == 6 and not c["modified"])
    offsets = [x["offsets"] for x in case["heads"]]
    for depth in (1, 2):
        perm = case["head_permutation_by_depth"][str(depth)]
        shared = Fibottention(shared_offsets=True).layout(196, 6, depth)
        assert shared.head_offsets == [offsets[perm[0]]] * 6
        mask = shared.mask()
        assert all(torch.equal(mask[0], mask[h]) for h in range(1, 6))
        per_head = Fibottention().mask(196, 6, depth)
        assert not any(torch.equal(per_head[0], per_head[h]) for h in range(1, 6))
        assert torch.equal(mask[0], per_head[0])  # head 0 keeps its own set
    fixed = Fibottention(shared_offsets=True, permute_heads_per_layer=False)
    assert fixed.layout(196, 6, 1).head_offsets == [offsets[0]] * 6 == fixed.layout(196, 6, 2).head_offsets
    # the layer's density is that one set's: here head 1's [1, 2, 3, 5] (window w_min = 5)
    layer = Attention(48, num_heads=6, attention={"name": "fibottention", "shared_offsets": True,
                                                  "permute_heads_per_layer": False})
    assert layer.density(196)["density_patch"] == pytest.approx(2 * (4 * 196 - 11) / 196**2)
    with pytest.raises(ValueError, match=r"^attention.shared_offsets='yes' must be true or false \(attention=fibottention\)$"):
        AttentionSpec.parse({"name": "fibottention", "shared_offsets": "yes"})


def test_shared_offsets_matched_uses_the_row_closest_to_the_mean_density():
    """shared_set=matched: one Wythoff row for every head and layer, the one whose pair count is
    closest to the per-head mean, so the ablation keeps Fibottention's density (digits: N=64, H=3)."""
    # rows 1-3 at N=64 (windows 5, 13, 21): [1,2,3,5], [4,7,11], [6,10,16] -> pairs 490, 340, 320
    per_head = Fibottention().layout(64, 3, 0)
    assert sorted(per_head.head_offsets) == [[1, 2, 3, 5], [4, 7, 11], [6, 10, 16]]
    matched = Fibottention(shared_offsets=True, shared_set="matched")
    for depth in range(4):
        assert matched.layout(64, 3, depth).head_offsets == [[4, 7, 11]] * 3   # |340 - 383.3| is the least
    layer = Attention(48, num_heads=3, attention={"name": "fibottention", "shared_offsets": True,
                                                  "shared_set": "matched"})
    assert layer.density(64)["density_patch"] == pytest.approx(340 / 64**2)
    assert Fibottention(shared_set="matched").mask(64, 3, 1).equal(Fibottention().mask(64, 3, 1))  # off: no effect
    with pytest.raises(ValueError, match=r"^attention.shared_set='median' must be first or matched \(attention=fibottention\)$"):
        Fibottention(shared_offsets=True, shared_set="median")


def test_shared_offsets_default_is_off_and_leaves_golden_masks():
    assert Fibottention().options["shared_offsets"] is False
    assert torch.equal(Fibottention(shared_offsets=False).mask(196, 12, 3), Fibottention().mask(196, 12, 3))
