"""The paper experiment overlays (conf/experiment/paper_*.yaml): each composes to the paper's pinned
recipe, names the published numbers and its command, and runs one fast_dev_run step on substitute
data the test writes where the overlay expects the real data (the model shrunk by overrides)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import fibo_run, mlflow_runs
from fibo.cli import CONF_DIR

EXPERIMENTS = Path(CONF_DIR) / "experiment"
IMAGE = {  # overlay: (data choice, classes, published dense / Fibottention top-1 %)
    "paper_cifar10": ("cifar10", 10, "84.2", "91.8"),
    "paper_cifar100": ("cifar100", 100, "59.4", "70.7"),
    "paper_tinyimagenet": ("imagefolder", 200, "75.2", "79.1"),
}
VIDEO = {"paper_video_smarthome": 31, "paper_video_ntu60": 60, "paper_video_nucla": 10}
ROBOT = {"paper_robomimic_lift": "lift", "paper_robomimic_can": "can"}
RECIPES = {"paper_image_recipe", "paper_video_recipe", "paper_robot_recipe"}  # shared parts


def _compose(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_every_paper_overlay_is_covered():
    found = {p.stem for p in EXPERIMENTS.glob("paper_*.yaml")} - RECIPES
    assert found == set(IMAGE) | set(VIDEO) | set(ROBOT), found


@pytest.mark.parametrize("name", sorted(IMAGE))
def test_image_overlay_pins_the_paper_recipe(name):
    data, classes, dense, fibo = IMAGE[name]
    cfg = _compose(f"experiment={name}")
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.model, choices.attention, choices.task) == (data, "vit_base", "fibottention", "image")
    assert cfg.model.name == "vit_base" and cfg.model.patch_size == 16 and cfg.data.img_size == 224  # ViT-B/16, 224 px
    assert cfg.data.num_classes == classes and cfg.experiment_name == name.replace("_", "-")
    assert cfg.trainer.max_epochs == 100
    assert (cfg.task.lr, cfg.task.lr_base_batch) == (1e-3, 256)  # 1e-3 x batch / 256
    assert cfg.task.weight_decay == 0.05 and cfg.task.label_smoothing == 0.1
    assert cfg.model.drop_path_rate == 0.2
    assert cfg.data.augment.auto_augment.startswith("rand-m9-") and cfg.data.augment.re_prob == 0.25
    assert cfg.task._target_ == "fibo.tasks.image.ImageClassifier"  # AdamW (timm), warmup + cosine
    header = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert f"dense {dense} / Fibottention {fibo}" in header
    assert f"fibo-run experiment={name}" in header and "Expected:" in header
    # the command line still chooses the attention (the paper's dense baseline)
    assert _compose(f"experiment={name}", "attention=dense").attention.name == "dense"


def test_paper_vit_b16_is_vit_b_with_the_papers_density():
    import torch
    from hydra.utils import instantiate

    from fibo.tasks.image import ImageClassifier

    cfg = _compose("experiment=paper_cifar10")
    with torch.device("meta"):  # shapes and patterns only: no 86M-parameter initialisation
        model = instantiate(cfg.model)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (768, 12, 12)
    assert model.patch_embed.num_patches == 196 and model.global_pool == "token"
    assert model.attention_density()["density_patch"] == pytest.approx(0.0199, abs=5e-4)  # the paper: 1.99%
    task = ImageClassifier(model, num_classes=10, lr=cfg.task.lr, batch_size=512, lr_base_batch=256)
    assert task.effective_lr == pytest.approx(2e-3)


@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_overlay_pins_the_papers_setting(name):
    cfg = _compose(f"experiment={name}")
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.data, choices.attention) == ("video", "videolist", "fibottention")
    assert cfg.model.name == "timesformer_base" and cfg.model.attention_type == "divided"
    assert cfg.model.patch_frames == 1  # TimeSformer's per-frame patches
    assert (cfg.data.num_frames, cfg.data.sampling_rate, cfg.data.img_size, cfg.model.patch_size) == (8, 32, 224, 16)
    assert cfg.attention.name == "fibottention" and cfg.model.temporal_attention == "dense"  # Fibottention in space only
    assert cfg.data.num_classes == VIDEO[name]
    assert cfg.data.train_list.endswith("/train.txt") and cfg.experiment_name == name.replace("_", "-")
    header = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert f"fibo-run experiment={name}" in header and "Expected:" in header


@pytest.mark.parametrize("name", sorted(ROBOT))
def test_robot_overlay_pins_the_papers_setting(name):
    cfg = _compose(f"experiment={name}")
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.data, choices.model, choices.attention) == ("robot", "robomimic_hdf5", "policy_fibo",
                                                                              "fibottention")
    model = cfg.model  # a ViT-B encoder on 8x8 patches of 76x76 crops of 84x84 images
    assert (model.encoder, model.stem, model.patch_size, model.embed_dim, model.depth, model.num_heads) == \
        ("transformer", "patch", 8, 768, 12, 12)
    assert (cfg.data.img_size, model.crop_size, model.readout) == (84, 76, "cls")
    assert cfg.data.path.endswith(f"robomimic/{ROBOT[name]}/ph/image.hdf5")
    assert cfg.result_metric.fit == "rollout/success_rate" and cfg.experiment_name == name.replace("_", "-")
    header = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert f"fibo-run experiment={name}" in header and "Expected:" in header
    assert _compose(f"experiment={name}", "attention=dense").attention.name == "dense"


# ---- one fast_dev_run step per overlay, on substitute data ---------------------------------------

SHRINK_IMAGE = ("model.name=vit_nano", "data.img_size=32", "model.patch_size=8", "data.batch_size=4",
                "data.num_workers=0")
SHRINK_VIDEO = ("model.name=timesformer_nano", "data.img_size=32", "model.patch_size=8", "data.batch_size=2",
                "data.num_workers=0", "++data.test_clips=1", "++data.test_crops=1")  # ++: the sweep's first
# compose (before experiment= applies) is on the default image data, which lacks these keys
ON_CPU = ("trainer.accelerator=cpu", "trainer.precision=32-true", "debug=fast_dev_run")

# torchvision checks the CIFAR archives' md5 sums: the substitute files pass with the check disabled
CIFAR_UNCHECKED = ("import sys, torchvision.datasets.cifar as c; c.check_integrity = lambda *a, **k: True; "
                   "from fibo.cli import main; sys.argv[0] = 'fibo-run'; main()")


def _write_cifar(folder: Path, classes: int, n_train: int, n_test: int, rng) -> None:
    folder.mkdir(parents=True)
    key = "labels" if classes == 10 else "fine_labels"

    def dump(name, n):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    if classes == 10:
        dump("data_batch_1", n_train)
        for i in range(2, 6):
            dump(f"data_batch_{i}", 0)
        dump("test_batch", n_test)
        meta, names = "batches.meta", "label_names"
    else:
        dump("train", n_train)
        dump("test", n_test)
        meta, names = "meta", "fine_label_names"
    with open(folder / meta, "wb") as f:
        pickle.dump({names: [f"c{i}" for i in range(classes)]}, f)


def _write_tiny_imagenet(root: Path, rng) -> None:
    """The extracted archive's layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt,
    and an unlabelled test/images/."""
    from PIL import Image

    def jpeg(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)

    wnids = [f"n{i:08d}" for i in range(200)]
    for wnid in wnids:
        jpeg(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    lines = []
    for i in range(4):
        jpeg(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    jpeg(root / "test" / "images" / "test_0.JPEG")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")


@pytest.mark.slow
def test_image_overlays_run_a_step(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _write_cifar(data / "cifar10" / "cifar-10-batches-py", 10, 5000 + 40, 16, rng)  # 5,000 are validation
    _write_cifar(data / "cifar100" / "cifar-100-python", 100, 5000 + 40, 16, rng)
    _write_tiny_imagenet(data / "tiny-imagenet-200", rng)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FIBO_DATA_DIR")}
    env.update({"FIBO_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    result = subprocess.run([sys.executable, "-c", CIFAR_UNCHECKED, "-m", f"experiment={','.join(sorted(IMAGE))}",
                             *SHRINK_IMAGE, *ON_CPU], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert sorted(r.data.tags["choice.experiment"] for r in runs) == sorted(IMAGE)
    assert result.stdout.count("fibo: test/acc1 = ") == len(IMAGE)  # fast_dev_run logs no metrics to MLflow
    for run in runs:
        assert run.info.status == "FINISHED"
        # the recipe stays pinned under the shrinking overrides
        assert run.data.params["task/lr_base_batch"] == "256" and run.data.params["model/drop_path_rate"] == "0.2"


def _write_video(path: Path, frames: int, rng) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.slow
def test_video_overlays_run_a_step(tmp_path):
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    videos = [tmp_path / "videos" / f"v{i}.mp4" for i in range(3)]
    for video in videos:
        _write_video(video, 8 * 32, rng)  # a clip spans (8 - 1) x 32 + 1 = 225 frames
    lines = "".join(f"{v} {i}\n" for i, v in enumerate(videos))  # absolute paths
    for name in VIDEO:
        root = tmp_path / "data" / name.removeprefix("paper_video_")
        root.mkdir(parents=True)
        for split in ("train", "val", "test"):
            (root / f"{split}.txt").write_text(lines)
    result = fibo_run("-m", f"experiment={','.join(sorted(VIDEO))}", *SHRINK_VIDEO, *ON_CPU, root=tmp_path, timeout=600,
                      env={"FIBO_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert sorted(r.data.tags["choice.experiment"] for r in runs) == sorted(VIDEO)
    assert result.stdout.count("fibo: test/acc1 = ") == len(VIDEO)  # fast_dev_run logs no metrics to MLflow
    assert "skipping" not in result.stdout + result.stderr  # every substitute video spans a clip
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["data/sampling_rate"] == "32" and run.data.params["model/temporal_attention"] == "dense"


def _write_robomimic(path: Path, rng, demos: int = 3, steps: int = 6) -> None:
    """A tiny robomimic image dataset with the paper's observation keys (no env_args: no rollouts)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i in range(demos):
            g = data.create_group(f"demo_{i}")
            for key in ("agentview_image", "robot0_eye_in_hand_image"):
                g.create_dataset(f"obs/{key}", data=rng.integers(0, 256, (steps, 84, 84, 3), dtype=np.uint8))
            for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2)):
                g.create_dataset(f"obs/{key}", data=rng.normal(size=(steps, dim)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (steps, 7)).astype(np.float32))
            g.attrs["num_samples"] = steps
        data.attrs["total"] = demos * steps
        f.create_dataset("mask/train", data=np.array([f"demo_{i}" for i in range(demos - 1)], dtype="S"))
        f.create_dataset("mask/valid", data=np.array([f"demo_{demos - 1}"], dtype="S"))


@pytest.mark.slow
def test_robot_overlays_run_a_step(tmp_path):
    pytest.importorskip("robomimic", reason='the robot extra: pip install -e ".[robot]"')
    rng = np.random.default_rng(0)
    for name, env in ROBOT.items():
        _write_robomimic(tmp_path / "data" / "robomimic" / env / "ph" / "image.hdf5", rng)
    # ++: the sweep's first compose (before experiment= applies) is on the default ViT, without these keys
    shrink = ("++model.embed_dim=32", "++model.depth=1", "++model.num_heads=2", "data.batch_size=2", "data.num_workers=0")
    result = fibo_run("-m", f"experiment={','.join(sorted(ROBOT))}", *shrink, *ON_CPU, root=tmp_path, timeout=600,
                      env={"FIBO_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    _, runs = mlflow_runs(tmp_path, "fibo-debug")
    assert sorted(r.data.tags["choice.experiment"] for r in runs) == sorted(ROBOT)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["model/patch_size"] == "8" and run.data.params["model/crop_size"] == "76"
