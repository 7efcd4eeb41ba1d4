"""ViT backbone: shapes, timm compatibility, errors."""

import pytest
import timm
import torch

from fibo.models import create_model


@pytest.mark.parametrize(
    "img_size,patch_size,in_chans,tokens",
    [(16, 2, 1, 64), (32, 4, 3, 64), (48, 8, 3, 36), ((32, 48), 8, 3, 24), (224, 16, 3, 196)],
)
@pytest.mark.parametrize("attention", ["dense", "fibottention"])
def test_shapes(img_size, patch_size, in_chans, tokens, attention):
    model = create_model("vit_nano", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=7, attention={"name": attention})
    hw = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, in_chans, *hw)
    assert model.num_patch_tokens == tokens
    assert model.forward_features(x).shape == (2, 1 + tokens, 96)
    assert model(x).shape == (2, 7)


def test_timm_state_dict_loads_and_dense_matches_timm():
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    ours = create_model("vit_tiny", img_size=224, patch_size=16, num_classes=10, attention={"name": "dense"}).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    # the same weights under Fibottention give a different function
    fib = create_model("vit_tiny", img_size=224, patch_size=16, num_classes=10, attention={"name": "fibottention"}).eval()
    fib.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert (fib(x) - ref(x)).abs().max() > 1e-3


def test_layers_get_their_own_permutation():
    model = create_model("vit_small", img_size=224, patch_size=16, num_classes=10, attention={"name": "fibottention"})
    masks = [blk.attn.get_mask(196) for blk in model.blocks[:3]]
    assert [blk.attn.layer_index for blk in model.blocks] == list(range(12))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    dens = model.attention_density()
    assert dens["density_patch"] == pytest.approx(0.035402, abs=5e-6)  # golden: N=196, H=6


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match=r"^image size 30 is not divisible by patch size 4: choose an image size that is a multiple of 4 \(e\.g\. 28\) or a patch size that divides 30$"):
        create_model("vit_nano", img_size=30, patch_size=4)


@pytest.mark.parametrize("name", ["vit_nano", "timesformer_nano"])
@pytest.mark.parametrize("patch_size", [0, -4, 2.5, True])
def test_patch_size_must_be_a_positive_integer(name, patch_size):
    with pytest.raises(ValueError, match=rf"^model.patch_size={patch_size!r} must be a positive integer: the patch side "
                                         rf"in pixels, dividing the image size \(e\.g\. 2 for 16 px images, 16 for 224 px\)$"):
        create_model(name, img_size=16, patch_size=patch_size)


@pytest.mark.parametrize("img_size", [0, -16, (16, -8)])
def test_image_size_must_be_positive(img_size):
    with pytest.raises(ValueError, match=r"^model.img_size=.* \(data.img_size\) must be a positive number of pixels "
                                         r"\(or \[height, width\]\)$"):
        create_model("vit_nano", img_size=img_size, patch_size=2)


def test_attention_temporal_key_names_its_new_place():
    for name in ("vit_nano", "timesformer_nano"):
        with pytest.raises(ValueError, match=r"^attention.temporal='same' is no longer an attention option: the temporal "
                                             r"pattern of a video model is model.temporal_attention=dense\|same"):
            create_model(name, img_size=16, patch_size=2, attention={"name": "fibottention", "temporal": "same"})
    video = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, temporal_attention="same",
                         attention={"name": "fibottention"})
    assert video.temporal_spec == video.attention_spec and video.blocks[1].temporal_attn.get_mask(4).shape == (3, 4, 4)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vit_huge'; known models: \['timesformer_base', 'timesformer_nano', 'timesformer_small', 'vit_base', 'vit_nano', 'vit_small', 'vit_tiny'\]"):
        create_model("vit_huge")


def test_wrong_input_size_is_reported():
    model = create_model("vit_nano", img_size=16, patch_size=2, in_chans=1, num_classes=10)
    with pytest.raises(AssertionError, match="Input height \\(32\\) doesn't match model \\(16\\)"):
        model(torch.randn(1, 1, 32, 32))
