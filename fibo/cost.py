"""Cost per run: the attention FLOPs a pattern computes, their dense equivalent and the whole
model's forward FLOPs, per sample; :class:`LogCost` logs them when training starts.

Convention: one forward pass of one sample; a multiply-add counts 2 FLOPs (as
:mod:`torch.utils.flop_counter` counts matrix products).

* **Attention** (:meth:`fibo.attention.Attention.attention_flops`, per attention call): the two
  products ``Q K^T`` and ``P V`` cost ``head_dim`` multiply-adds per computed (query, key) entry,
  ``entries x head_dim x 2 x 2``; entries = the pairs the pattern allows, summed over heads
  (``density x H x L^2``; all ``H x L^2`` for dense attention and ``zero_score`` semantics). Dense
  attention over L tokens thus costs ``4 H L^2 d``. Softmax, scaling and masking are not counted.
* **Model**: :class:`torch.utils.flop_counter.FlopCounterMode` over one forward of the example
  (linear layers, convolutions, matrix products; norms, activations and adds count 0), with the
  attention core replaced by the pattern's count. The counter cannot count the core itself: it
  counts CUDA SDPA kernels dense whatever the mask, counts nothing for PyTorch's CPU flash kernel
  and cannot see the sparse CPU kernel's custom op. So the counted forward runs with every
  attention module temporarily dense (no mask, no sparse kernel, no FlexAttention compile), the
  counter's FLOPs inside each attention module minus those of its child modules (``qkv``, ``proj``)
  are subtracted, and the pattern's count of every attention call is added:
  ``model_flops = counted - counted attention cores + attention_flops``.

Per sample: every attention call of the forward is recorded with its number of sequences and their
length (a TimeSformer's divided attention attends T frames of 1 + P tokens and P positions of T
frames per sample), and the counts are divided by the example's batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fibo.attention import Attention, AttentionSpec

log = logging.getLogger("fibo")
METRICS = ("cost/attention_flops", "cost/attention_flops_dense", "cost/model_flops", "cost/model_flops_dense")


@dataclass(frozen=True)
class Cost:
    """Forward FLOPs per sample (see the module docstring for the convention)."""

    attention_flops: float  # what the attention pattern computes, summed over layers and calls
    attention_flops_dense: float  # the same attention calls, dense
    model_flops: float  # the whole forward, attention counted by the pattern
    model_flops_dense: float  # the whole forward with dense attention

    def metrics(self) -> dict[str, float]:
        """``{"cost/attention_flops": ..., ...}`` (:data:`METRICS`)."""
        return {f"cost/{k}": float(v) for k, v in asdict(self).items()}


def _batch_size(value: Any) -> int | None:
    """Size of dim 0 of the first tensor in ``value`` (tensors, sequences and mappings of them)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        size = _batch_size(item)
        if size is not None:
            return size
    return None


def first_sample(value: Any) -> Any:
    """``value`` cut to its first sample: tensors ``[:1]``, sequences and mappings item by item."""
    if isinstance(value, torch.Tensor):
        return value[:1].detach() if value.ndim else value
    if isinstance(value, Mapping):
        return {k: first_sample(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(first_sample(v) for v in value)
    return value


def forward_cost(model: nn.Module, *args: Any, **kwargs: Any) -> Cost:
    """Forward FLOPs per sample of ``model(*args, **kwargs)``, a batch of B samples (B = dim 0 of the
    first tensor argument; one sample is enough). Runs the forward once, without gradients and in
    eval mode, with attention temporarily dense; the model's modes and patterns are restored.

    Raises:
        ValueError: no tensor in the arguments (no batch size).
    """
    batch = _batch_size((args, kwargs))
    if batch is None:
        raise ValueError("forward_cost needs the model's input as tensors (none among the arguments)")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    counter = FlopCounterMode(display=False)
    calls: list[tuple[Attention, int, int]] = []  # (module, sequences, tokens per sequence)
    starts: list[int] = []
    core = 0  # FLOPs the counter saw inside attention modules, outside their child modules

    def attention_start(module, inputs, kw):
        x = inputs[0] if inputs else next(iter(kw.values()))
        calls.append((module, int(x.shape[0]), int(x.shape[1])))
        starts.append(counter.get_total_flops())

    def attention_end(module, inputs, kw, output):
        nonlocal core
        core += counter.get_total_flops() - starts.pop()

    def child_start(module, inputs):
        starts.append(counter.get_total_flops())

    def child_end(module, inputs, output):
        nonlocal core
        core -= counter.get_total_flops() - starts.pop()

    hooks = []
    for attn in attentions:
        hooks.append(attn.register_forward_pre_hook(attention_start, with_kwargs=True))
        hooks.append(attn.register_forward_hook(attention_end, with_kwargs=True))
        for child in attn.children():
            hooks += [child.register_forward_pre_hook(child_start), child.register_forward_hook(child_end)]
    specs = {attn: attn.spec for attn in attentions}
    modes = {m: m.training for m in model.modules()}
    try:
        for attn in attentions:
            attn.spec = AttentionSpec()  # dense: the core's count is replaced below
        model.eval()
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        for attn, spec in specs.items():
            attn.spec = spec
        for m, training in modes.items():
            m.training = training
        for h in hooks:
            h.remove()
    attention = dense = 0
    for attn, sequences, tokens in calls:
        flops = attn.attention_flops(tokens - attn.num_prefix_tokens)
        attention += sequences * flops["flops"]
        dense += sequences * flops["flops_dense"]
    rest = counter.get_total_flops() - core
    return Cost(attention / batch, dense / batch, (rest + attention) / batch, (rest + dense) / batch)


def _model_of(pl_module: L.LightningModule) -> nn.Module:
    """What to count: ``pl_module.model`` (every fibo task wraps its model there), else the module."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


class LogCost(L.Callback):
    """Logs :data:`METRICS` (forward FLOPs per sample; see :func:`forward_cost`) once per fit, at the
    first training batch: the model's input of that batch (the task's own preprocessing included),
    cut to one sample, is counted after the step. Every process counts (FSDP gathers weights in the
    forward); rank zero logs to every logger at step 0.
    """

    def __init__(self) -> None:
        self._hook = None
        self._example: tuple | None = None
        self.cost: Cost | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cost is not None or self._hook is not None:
            return

        def capture(module, args, kwargs):
            if self._example is None:
                self._example = (first_sample(args), first_sample(kwargs))

        self._hook = _model_of(pl_module).register_forward_pre_hook(capture, with_kwargs=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        if self._example is None:
            log.warning("LogCost: the task did not call its model in the first training step; no cost logged")
            return
        args, kwargs = self._example
        self._example = None
        self.cost = forward_cost(_model_of(pl_module), *args, **kwargs)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.cost.metrics(), step=0)
