"""fibo-analyze (issue 10 item 3): linear CKA, head ablation, recomputed attention probabilities,
attention statistics, corruptions, and the command end to end on a real digits checkpoint."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fibo.analysis.cka import HeadCKA, linear_cka, mean_off_diagonal
from fibo.analysis.hooks import attention_probs, attention_sites, hooks, on_head_outputs, zero_head
from fibo.analysis.stats import AttentionStats, token_coordinates
from fibo.attention import Attention

ROOT = Path(__file__).resolve().parents[1]


# ---- linear CKA (Kornblith et al. 2019) -------------------------------------------------------

def test_cka_of_features_with_themselves_is_one():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_of_independent_features_is_near_zero():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g)
    # expectation about sqrt(p q) / n = 0.0016 for independent Gaussian features
    assert linear_cka(x, y) < 0.01
    assert linear_cka(x, x @ torch.randn(8, 8, generator=g) + 0.1 * y) > 0.5  # dependent: far from 0


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64) + torch.randn(400, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    assert linear_cka(3.7 * x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    # not invariant to an anisotropic scaling (CKA is not CCA): the check above can fail
    assert abs(linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64), y) - base) > 1e-3


def test_streamed_head_cka_equals_linear_cka_of_each_pair():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 3 * 4, generator=g)
    z[:, 8:] = z[:, :4] @ torch.randn(4, 4, generator=g)  # head 2 = a linear map of head 0
    acc = HeadCKA(num_heads=3)
    for chunk in z.reshape(3, 100, 12):  # streamed in batches, leading dims flattened
        acc.update(chunk.reshape(10, 10, 12))
    m = acc.matrix()
    for i in range(3):
        for j in range(3):
            assert m[i, j].item() == pytest.approx(linear_cka(z[:, 4 * i:4 * i + 4], z[:, 4 * j:4 * j + 4]), abs=1e-9)
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype))
    off = [m[0, 1], m[0, 2], m[1, 2]]
    assert mean_off_diagonal(m) == pytest.approx(float(sum(off) / 3))


# ---- hooks on fibo's Attention ------------------------------------------------------------------

def _attention(name="fibottention", **kw):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qkv_bias=True, attention={"name": name, **kw}, layer_index=1).eval()
    x = torch.randn(2, 1 + 16, 24)
    return attn, x


def test_zeroing_a_head_changes_the_output_only_through_that_head():
    attn, x = _attention()
    seen = []
    with torch.no_grad(), hooks([on_head_outputs(attn, lambda z: seen.append(z.clone()))]):
        full = attn(x)
    z = seen[0]
    d = attn.head_dim
    for h in range(3):
        seen.clear()
        with torch.no_grad(), hooks([zero_head(attn, h), on_head_outputs(attn, lambda z: seen.append(z.clone()))]):
            ablated = attn(x)
        zh = seen[0]  # what proj received (the zeroing hook ran first)
        assert torch.all(zh[..., h * d:(h + 1) * d] == 0)
        keep = [i for i in range(3 * d) if not h * d <= i < (h + 1) * d]
        assert torch.equal(zh[..., keep], z[..., keep])  # the other heads' slices untouched
        manual = torch.nn.functional.linear(zh, attn.proj.weight, attn.proj.bias)
        torch.testing.assert_close(ablated, manual)
        # the change is exactly head h's contribution through its columns of proj
        torch.testing.assert_close(full - ablated, z[..., h * d:(h + 1) * d] @ attn.proj.weight[:, h * d:(h + 1) * d].T)
    with pytest.raises(ValueError, match="head 3 out of range: the module has 3 heads"):
        zero_head(attn, 3)


@pytest.mark.parametrize("name", ["fibottention", "dense"])
def test_recomputed_probabilities_match_the_modules_own_attention(name):
    attn, x = _attention(name)
    got = {}
    hs = [attn.qkv.register_forward_hook(lambda m, a, out: got.setdefault("qkv", out)),
          on_head_outputs(attn, lambda z: got.setdefault("z", z))]
    with torch.no_grad(), hooks(hs):
        attn(x)
    probs = attention_probs(attn, got["qkv"])
    B, L = x.shape[:2]
    assert probs.shape == (B, 3, L, L)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, 3, L))
    mask = attn.get_mask(L - 1, x.device)
    if name == "dense":
        assert mask is None
    else:
        assert not mask.all()
        assert torch.all(probs[:, ~mask] == 0)  # masked entries exactly 0
        # the dense-mask path: -inf outside the mask, softmax
        q, k, _ = got["qkv"].reshape(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
        ref = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(probs, ref)
    # probs @ v is what the module itself computed (whatever its backend), before proj
    v = got["qkv"].reshape(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(B, L, 24), got["z"], atol=1e-5, rtol=1e-4)


def test_zero_score_semantics_multiplies_the_scores_by_the_mask():
    attn, x = _attention("fibottention", mask_semantics="zero_score")
    out = {}
    with torch.no_grad(), hooks([attn.qkv.register_forward_hook(lambda m, a, o: out.setdefault("qkv", o))]):
        attn(x)
    probs = attention_probs(attn, out["qkv"])
    mask = attn.get_mask(16, x.device)
    assert torch.all(probs[:, ~mask] > 0)  # masked entries score 0, still in the softmax
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17))


def test_attention_statistics_of_uniform_attention_on_a_2x2_grid():
    assert token_coordinates(4, (2, 2)).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert token_coordinates(8, (2, 2))[5].tolist() == [1, 0, 1]  # joint: (frame, row, col)
    assert token_coordinates(3, (2, 2)).tolist() == [[0], [1], [2]]  # not a grid: a sequence
    assert token_coordinates(4, None).tolist() == [[0], [1], [2], [3]]  # temporal attention: frames
    stats = AttentionStats(num_heads=2, num_prefix_tokens=1, grid=(2, 2))
    probs = torch.full((3, 2, 5, 5), 0.2)  # uniform over CLS + 4 patches
    probs[:, 1] = 0
    probs[:, 1, :, 0] = 1.0  # head 1: every query looks only at CLS ... except:
    probs[:, 1, 1:, 0] = 0.5
    probs[:, 1, 1:, 1:] = torch.eye(4) * 0.5  # ... patch queries split between CLS and themselves
    stats.update(probs)
    res = stats.result()
    # head 0: distances from any patch to the 4 patches are 0, 1, 1, sqrt(2); CLS is left out
    assert res["distance"][0].item() == pytest.approx((2 + math.sqrt(2)) / 4)
    assert res["entropy"][0].item() == pytest.approx(math.log(5))
    assert res["distance"][1].item() == pytest.approx(0.0)
    assert res["entropy"][1].item() == pytest.approx(math.log(2))
    # a 1-D sequence (temporal attention, no CLS): uniform over 4 frames, mean |i - j| = 20 / 16
    frames = AttentionStats(num_heads=1, num_prefix_tokens=0, grid=None)
    frames.update(torch.full((2, 1, 4, 4), 0.25))
    assert frames.result()["distance"].item() == pytest.approx(1.25)


# ---- corruptions (imagecorruptions) ---------------------------------------------------------------

def _digit() -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[0] * 255 / 16).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BICUBIC))


def test_corruption_differs_from_clean_and_grows_with_severity():
    from fibo.analysis.corruptions import corrupt_array

    img = _digit()
    diffs = []
    for s in (1, 3, 5):
        out = corrupt_array(img, "gaussian_noise", s, seed=7)
        assert out.shape == img.shape and out.dtype == np.uint8
        diffs.append(np.abs(out.astype(int) - img).mean())
    assert 0 < diffs[0] < diffs[1] < diffs[2]
    assert np.array_equal(corrupt_array(img, "gaussian_noise", 3, seed=7), corrupt_array(img, "gaussian_noise", 3, seed=7))
    assert not np.array_equal(corrupt_array(img, "gaussian_noise", 3, seed=7), corrupt_array(img, "gaussian_noise", 3, seed=8))
    rgb = np.stack([img, img // 2, 255 - img], -1)
    assert corrupt_array(rgb, "fog", 2).shape == rgb.shape


def test_corruption_names_and_severities_are_checked():
    from fibo.analysis.analyze import corruption_names
    from fibo.analysis.corruptions import corrupt_array

    assert len(corruption_names("common")) == 15 and len(corruption_names("all")) == 19
    assert corruption_names(["fog"]) == ["fog"]
    with pytest.raises(ValueError, match=r"^unknown corruption 'fogg': choose from \["):
        corruption_names(["fogg"])
    with pytest.raises(ValueError, match=r"^corruptions.names='most': choose a set \["):
        corruption_names("most")
    with pytest.raises(ValueError, match=r"^corruption severity 6: severities are integers 1-5$"):
        corrupt_array(_digit(), "fog", 6)


# ---- the command, end to end on a real digits checkpoint ------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A real, short fibo-run on the digits (1 epoch of 3 batches) -> (root, checkpoint)."""
    from conftest import fibo_run

    root = tmp_path_factory.mktemp("analyze")
    result = fibo_run("debug=short", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                      "test=false", "experiment_name=fibo", root=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = next((root / "logs" / "runs").glob("*/checkpoints/last.ckpt"))
    return root, ckpt


def _compose(*overrides: str):
    """``conf/analyze.yaml`` composed by Hydra with ``overrides``, as fibo-analyze composes it."""
    from hydra import compose, initialize_config_dir

    from fibo.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="analyze", overrides=list(overrides))


def _analyze_cmd(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    import os

    exe = Path(sys.executable).with_name("fibo-analyze")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["FIBO_ROOT"] = str(root)
    return subprocess.run([str(exe), *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_fibo_analyze_logs_into_the_same_run_and_writes_the_figures(digits_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fibo.analysis.analyze import analyze
    from fibo.tracking import RUN_ID_KEY

    root, ckpt = digits_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = torch.load(ckpt, map_location="cpu", weights_only=False)[RUN_ID_KEY]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    status = client.get_run(run_id).info.status
    cfg = _compose(f"ckpt_path={ckpt}", "split=val", "max_samples=32", "corruptions.names=[gaussian_noise]",
                   "corruptions.severities=[1,5]", "pictures.num_inputs=2")
    summary = analyze(cfg, tmp_path / "analysis")
    assert summary.run_id == run_id and not summary.child_run
    run = client.get_run(run_id)
    assert run.info.status == status  # logged into the run, its status unchanged
    m = run.data.metrics
    assert 0.0 <= m["analysis/head_cka_mean"] <= 1.0
    layers = [m[f"analysis/head_cka_mean/layer_{i}"] for i in range(4)]  # vit_nano: 4 layers, 3 heads
    assert m["analysis/head_cka_mean"] == pytest.approx(sum(layers) / 4)
    accs = [m[f"analysis/ablation/layer_{i}/head_{h}"] for i in range(4) for h in range(3)]
    assert m["analysis/ablation_max_drop"] == pytest.approx(m["analysis/acc1"] - min(accs))
    assert m["analysis/corruption_mean"] == pytest.approx((m["analysis/corruption/gaussian_noise/s1"]
                                                           + m["analysis/corruption/gaussian_noise/s5"]) / 2)
    assert 0 < m["analysis/attn_entropy/layer_0/head_0"] <= math.log(65) + 1e-6
    assert m["analysis/attn_distance/layer_0/head_0"] > 0
    assert run.data.tags["analysis.split"] == "val"
    art = {a.path for a in client.list_artifacts(run_id, "analysis")}
    for name in ("head_cka", "attention_stats", "ablation", "corruptions", "patterns", "cls_attention_layer_0"):
        assert f"analysis/{name}.png" in art
    pngs = list((tmp_path / "analysis").glob("*.png"))
    assert len(pngs) == len(art) and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_fibo_analyze_without_ckpt_path_is_one_clear_line(tmp_path):
    result = _analyze_cmd(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fibo-analyze: ckpt_path is missing: fibo-analyze ckpt_path=<run dir>/checkpoints/last.ckpt "
        "(a checkpoint written by fibo-run for an image or video task)")


def _cfg(**overrides):
    return _compose(*(f"{k}={v}" for k, v in overrides.items()))


def test_errors_name_the_bad_input(digits_run, tmp_path):
    from fibo.analysis.analyze import analyze

    root, ckpt = digits_run
    with pytest.raises(FileNotFoundError, match=r"^ckpt_path=/no/such.ckpt does not exist"):
        analyze(_cfg(ckpt_path="/no/such.ckpt"), tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a Lightning checkpoint that torch.load can read"):
        analyze(_cfg(ckpt_path=str(junk)), tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "epoch": 0}, foreign)  # no run id
    with pytest.raises(ValueError, match=r"is not a fibo checkpoint \(no MLflow run id in it\): pass a .ckpt written by fibo-run$"):
        analyze(_cfg(ckpt_path=str(foreign)), tmp_path)
    with pytest.raises(ValueError, match=r"^split='train': the data has no such split; choose split=val or split=test$"):
        analyze(_cfg(ckpt_path=str(ckpt), split="train"), tmp_path)
    from conftest import free_port

    from fibo.tracking import TrackingError

    port = free_port()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port}"):  # before any pass over the data
        analyze(_cfg(ckpt_path=str(ckpt), tracking_uri=f"http://127.0.0.1:{port}"), tmp_path)
    # a robot run: the same run folder with the robot task in its config
    robot = tmp_path / "robot_run"
    shutil.copytree(ckpt.parent.parent, robot)
    cfg = OmegaConf.load(robot / ".hydra" / "config.yaml")
    cfg.task = OmegaConf.load(ROOT / "conf" / "task" / "robot.yaml").task
    OmegaConf.save(cfg, robot / ".hydra" / "config.yaml")
    with pytest.raises(ValueError, match=r"is a checkpoint of task fibo.tasks.robot.BehaviorCloning; "
                                         r"fibo-analyze supports image and video runs \(task=image, task=video\)$"):
        analyze(_cfg(ckpt_path=str(robot / "checkpoints" / "last.ckpt")), tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model.patch_size": 4}, r"its weights do not fit the model of its run config \(Error\(s\) in loading state_dict"),
    ({"attention.name": "nope"}, r"does not build with this fibo: unknown attention pattern 'nope'"),
])
def test_a_run_config_that_does_not_fit_its_checkpoint_is_named(digits_run, tmp_path, change, message):
    from fibo.analysis.analyze import analyze

    _, ckpt = digits_run
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    for key, value in change.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    with pytest.raises(ValueError, match=r"^ckpt_path=.*" + message):
        analyze(_cfg(ckpt_path=str(run / "checkpoints" / "last.ckpt")), tmp_path)


def test_a_run_gone_from_the_store_gets_a_child_run(digits_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fibo.analysis.analyze import analyze
    from fibo.tracking import RUN_ID_KEY

    root, ckpt = digits_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = torch.load(ckpt, map_location="cpu", weights_only=False)[RUN_ID_KEY]
    gone = tmp_path / "gone_run"  # the run folder, pointed at a copy of the store in which the run is deleted
    shutil.copytree(ckpt.parent.parent, gone)
    shutil.copy(root / "mlflow.db", tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_run(original)
    before = client.get_run(original).data.metrics
    cfg = OmegaConf.load(gone / ".hydra" / "config.yaml")
    cfg.paths.root_dir = str(tmp_path)
    OmegaConf.save(cfg, gone / ".hydra" / "config.yaml")
    summary = analyze(_cfg(ckpt_path=str(gone / "checkpoints" / "last.ckpt"), max_samples=16, ablation="false",
                           **{"corruptions.names": "[]", "pictures.num_inputs": 0}), tmp_path / "out")
    assert summary.child_run and summary.run_id != original
    child = client.get_run(summary.run_id)
    assert child.data.tags["mlflow.parentRunId"] == original and child.info.status == "FINISHED"
    assert "analysis/head_cka_mean" in child.data.metrics
    assert client.get_run(original).data.metrics == before  # nothing logged into the deleted run


@pytest.mark.parametrize("attention_type", ["divided", "joint"])
def test_measurements_on_a_tiny_timesformer(attention_type):
    from fibo.analysis.measure import cls_attention_maps, head_ablation, heads_pass, patch_grid
    from fibo.models.timesformer import TimeSformer

    torch.manual_seed(0)
    model = TimeSformer(img_size=16, patch_size=4, num_frames=4, in_chans=3, num_classes=4, embed_dim=24, depth=2,
                        num_heads=3, attention={"name": "fibottention"}, attention_type=attention_type).eval()
    sites = attention_sites(model)
    names = [(s.name, s.key, s.kind) for s in sites]
    if attention_type == "divided":
        assert names == [("blocks.0.attn", "layer_0", "spatial"), ("blocks.0.temporal_attn", "temporal_layer_0", "temporal"),
                         ("blocks.1.attn", "layer_1", "spatial"), ("blocks.1.temporal_attn", "temporal_layer_1", "temporal")]
    else:
        assert names == [("blocks.0.attn", "layer_0", "spatial"), ("blocks.1.attn", "layer_1", "spatial")]
    clips = torch.randn(6, 3, 4, 16, 16)
    batches = [(clips[:3], torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])), (clips[3:], torch.tensor([3, 1, 2]), torch.tensor([2, 3, 4]))]
    grid = patch_grid(model)
    res = heads_pass(model, sites, batches, torch.device("cpu"), grid)
    assert res.accuracy in {i / 5 for i in range(6)}  # 5 videos (video 0 has two views)
    assert res.num_tokens["layer_0"] == (16 if attention_type == "divided" else 64)
    for key, m in res.cka.items():
        assert m.shape == (3, 3) and np.allclose(np.diag(m), 1)
    if attention_type == "divided":
        assert res.num_tokens["temporal_layer_0"] == 4
        assert (res.distance["temporal_layer_0"] <= 3).all()  # frames: at most T - 1 apart
    maps = cls_attention_maps(model, sites, clips[:2], torch.device("cpu"), grid)
    assert set(maps) == {"layer_0", "layer_1"}  # temporal attention has no CLS token
    assert maps["layer_0"].shape == (4, 3, 4, 4)  # one row per frame of the first clip, heads, grid
    if attention_type == "divided":  # each frame's CLS row sums to 1 over CLS + that frame's patches
        assert (maps["layer_0"].sum((-1, -2)) <= 1 + 1e-5).all()
    abl = head_ablation(model, sites[:1], lambda: batches, torch.device("cpu"))
    assert abl["layer_0"].shape == (3,)
