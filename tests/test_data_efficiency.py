"""experiment=data_efficiency: the digits sweep over training-set sizes x {dense, Fibottention,
Longformer at Fibottention's density} x 3 seeds composes, is FLOP-matched, and runs."""

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import fibo_run, mlflow_runs
from fibo import compare
from fibo.cli import CONF_DIR
from fibo.models import create_model

VARIANTS = ("dense", "fibottention", "longformer")


def _compose(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=data_efficiency", *overrides], return_hydra_config=True)


def test_the_sweep_is_sizes_by_variants_by_seeds():
    cfg = _compose()
    assert cfg.experiment_name == "data-efficiency"
    params = dict(cfg.hydra.sweeper.params)
    assert params == {"seed": "0,1,2", "+experiment/data_efficiency/budget": "n100,n200,n400,n1300",
                      "+experiment/data_efficiency": "dense,fibottention,longformer"}
    assert math.prod(len(v.split(",")) for v in params.values()) == 36
    assert cfg.hydra.runtime.choices.data == "digits"


@pytest.mark.parametrize("size", [100, 200, 400, 1300])
def test_every_size_trains_for_the_same_step_budget(size):
    """data.train_samples=<size> with epochs x steps per epoch within 3% of 600 optimizer steps (batch
    32, last batch kept), 15 to 25 validations, and warmup a tenth of the epochs."""
    cfg = _compose(f"+experiment/data_efficiency/budget=n{size}")
    assert cfg.data.train_samples == size and cfg.data.batch_size == 32
    steps = cfg.trainer.max_epochs * math.ceil(size / 32)
    assert abs(steps - 600) <= 18
    assert 15 <= cfg.trainer.max_epochs / cfg.trainer.check_val_every_n_epoch <= 25
    assert cfg.task.warmup_epochs == pytest.approx(cfg.trainer.max_epochs / 10, abs=0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_chooses_its_attention(variant):
    cfg = _compose(f"+experiment/data_efficiency={variant}")
    assert cfg.hydra.runtime.choices.attention == variant == cfg.attention.name
    assert cfg.attention.get("target_density") == (0.0936 if variant == "longformer" else None)


def test_longformer_is_at_fibottentions_density_in_the_default_digits_model():
    """The overlay's target density is the patch-block density Fibottention logs for this model, and
    the window it picks is the sliding window closest to it (window 3 at 64 patch tokens)."""
    fibo = instantiate(_compose("+experiment/data_efficiency=fibottention").model)
    fibo_density = fibo.attention_density()["density_patch"]
    cfg = _compose("+experiment/data_efficiency=longformer")
    assert cfg.attention.target_density == round(fibo_density, 4) == 0.0936
    longformer = instantiate(cfg.model).attention_density()["density_patch"]
    assert longformer == pytest.approx(436 / 4096)  # 64 + 2 (63 + 62 + 61) of the 64 x 64 pairs: window 3

    def window(w):
        return create_model("vit_nano", img_size=16, patch_size=fibo.patch_embed.patch_size[0], in_chans=1,
                            num_classes=10, attention={"name": "longformer", "window": w}).attention_density()["density_patch"]

    assert longformer == window(3)
    assert min(abs(window(w) - fibo_density) for w in range(8)) == abs(longformer - fibo_density)


@pytest.mark.slow
def test_the_overlay_runs_each_variant_on_a_subset(tmp_path):
    result = fibo_run("-m", "experiment=data_efficiency", "debug=fast_dev_run", "+experiment/data_efficiency/budget=n100", "seed=0",
                      "experiment_name=data-efficiency", root=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    _, runs = mlflow_runs(tmp_path, "data-efficiency")
    by_attention = {r.data.params["attention/name"]: r for r in runs}
    assert sorted(by_attention) == sorted(VARIANTS) and len(runs) == 3
    for run in runs:
        assert run.data.params["data/train_samples"] == "100" and run.data.metrics["data/train_samples"] == 100
    assert by_attention["longformer"].data.metrics["attention/density_patch"] == pytest.approx(436 / 4096)
    assert by_attention["fibottention"].data.metrics["attention/density_patch"] == pytest.approx(0.0936, abs=5e-5)

    # fibo-compare draws these runs against the param fibo-run logged: one row per variant, one column
    # (fast_dev_run logs no training metrics: the density, logged at the start, stands in for one)
    result = compare.compare(["data-efficiency"], tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                             metric="attention/density_patch", x="data.train_samples", out_dir=tmp_path / "compare",
                             log=False, quiet=True)
    assert result.x == "data/train_samples" and result.warnings == []
    rows = {r["attention"]: r for r in result.rows}
    assert sorted(rows) == sorted(VARIANTS)
    for attention, row in rows.items():
        density = by_attention[attention].data.metrics["attention/density_patch"]
        assert row["train_samples=100"] == f"{density:.4f} ± - (1)"
    assert (tmp_path / "compare" / "comparison.png").stat().st_size > 10_000
