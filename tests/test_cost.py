"""fibo.cost: attention FLOPs by the pattern (dense = 4 H L^2 d), whole-model FLOPs against a hand
count of the linear layers, per-call accounting in a video model, LogCost in a real Lightning fit."""

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from fibo import compare
from fibo.cost import METRICS, LogCost, forward_cost
from fibo.models import create_model

# vit_nano on 16x16 digits with patch 2: N = 64 patch tokens, L = 65 with CLS, width 96, 4 blocks of 3 heads of 32
N, L_, C, DEPTH, H, D, CLASSES = 64, 65, 96, 4, 3, 32, 10
DENSE_ATTENTION = DEPTH * 4 * H * L_**2 * D  # Q K^T and P V: L^2 entries x d multiply-adds x 2 FLOPs, per head
# patch embedding (a p x p conv = a linear layer per patch), per block qkv + proj + MLP (ratio 4), the head
LINEARS = 2 * N * C * (1 * 2 * 2) + DEPTH * 2 * L_ * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) + 2 * C * CLASSES


def vit(attention=None):
    return create_model("vit_nano", img_size=16, patch_size=2, in_chans=1, num_classes=CLASSES, attention=attention)


def test_dense_attention_flops_match_the_formula_and_the_library_count():
    model, x = vit(), torch.randn(1, 1, 16, 16)
    cost = forward_cost(model, x)
    assert cost.attention_flops == cost.attention_flops_dense == DENSE_ATTENTION == 6_489_600
    # torch's own count of SDPA (its math path: two batched matmuls) follows the same convention
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == DENSE_ATTENTION


def test_a_sparse_pattern_counts_density_times_dense():
    model = vit({"name": "fibottention"})
    cost = forward_cost(model, torch.randn(2, 1, 16, 16))  # per sample: a batch of 2 counts the same
    densities = [blk.attn.density(N)["density"] for blk in model.blocks]
    assert cost.attention_flops == pytest.approx(sum(densities) / DEPTH * DENSE_ATTENTION, rel=1e-12)
    assert cost.attention_flops_dense == DENSE_ATTENTION
    assert 0.10 < cost.attention_flops / DENSE_ATTENTION < 0.13  # 12.1% of the (N+1)^2 matrix, CLS included


@pytest.mark.parametrize("attention", [None, {"name": "fibottention"}, {"name": "fibottention", "backend": "sparse"}])
@pytest.mark.parametrize("sdpa", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
def test_model_flops_are_the_linear_layers_plus_the_patterns_attention(attention, sdpa):
    """Whatever the counter sees of the attention core (nothing for the CPU flash kernel, 4 H L^2 d for
    the math path) is replaced by the pattern's count."""
    model = vit(attention)
    with sdpa_kernel(sdpa):
        cost = forward_cost(model, torch.randn(1, 1, 16, 16))
    assert cost.model_flops == LINEARS + cost.attention_flops
    assert cost.model_flops_dense == LINEARS + DENSE_ATTENTION == 64_048_512


def test_zero_score_semantics_computes_every_entry():
    cost = forward_cost(vit({"name": "fibottention", "mask_semantics": "zero_score"}), torch.randn(1, 1, 16, 16))
    assert cost.attention_flops == DENSE_ATTENTION


def test_counting_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model, x = vit({"name": "fibottention"}), torch.randn(3, 1, 16, 16)
    model.blocks[1].eval()  # a submodule in another mode than its parent keeps it
    specs = [blk.attn.spec for blk in model.blocks]
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    model.blocks[1].eval()
    forward_cost(model, x[:1])
    assert [blk.attn.spec for blk in model.blocks] == specs and all(a is b for a, b in zip(specs, (blk.attn.spec for blk in model.blocks)))
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)  # the pattern (and its caches) unchanged


def test_video_model_counts_every_attention_call_per_sample():
    """Divided space-time attention: per block, spatial attention over T frames of 1 + P tokens and
    temporal attention over P positions of T frames (no CLS)."""
    T, P = 4, 16
    model = create_model("timesformer_nano", img_size=16, patch_size=4, in_chans=1, num_frames=T, num_classes=5,
                         attention={"name": "fibottention"})  # temporal attention: dense (the default)
    cost = forward_cost(model, torch.randn(2, 1, T, 16, 16))
    per_block = [T * blk.attn.attention_flops(P)["flops"] + P * blk.temporal_attn.attention_flops(T)["flops"]
                 for blk in model.blocks]
    assert cost.attention_flops == sum(per_block)
    assert cost.attention_flops_dense == len(model.blocks) * (T * 4 * H * (P + 1) ** 2 * D + P * 4 * H * T**2 * D)


def test_no_tensor_input_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        forward_cost(vit(), [])
    assert str(err.value) == "forward_cost needs the model's input as tensors (none among the arguments)"


def test_log_cost_logs_the_cost_of_the_first_batch_to_mlflow(tmp_path):
    from lightning.pytorch.loggers import MLFlowLogger

    from fibo.tasks.image import ImageClassifier

    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, CLASSES, (8,))
    task = ImageClassifier(vit({"name": "fibottention"}), num_classes=CLASSES)
    logger = MLFlowLogger(experiment_name="cost", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_location=(tmp_path / "artifacts").as_uri())
    callback = LogCost()
    trainer = L.Trainer(max_steps=2, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(TensorDataset(images, labels), batch_size=4))
    expected = forward_cost(task.model, images[:1])
    assert callback.cost == expected and expected.attention_flops < expected.attention_flops_dense
    metrics = logger.experiment.get_run(logger.run_id).data.metrics
    assert {k: metrics[k] for k in METRICS} == expected.metrics()
    history = logger.experiment.get_metric_history(logger.run_id, "cost/attention_flops")
    assert [(m.step, m.value) for m in history] == [(0, expected.attention_flops)]  # once per fit


def test_fibo_compare_reads_the_metric_log_cost_writes():
    assert compare.FLOPS_METRIC == METRICS[0] == "cost/attention_flops"
