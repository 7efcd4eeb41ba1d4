"""The measurements of :mod:`fibo.analysis` on a model and a split, each a function that returns
plain numbers (numpy arrays keyed by the attention site's ``key``).

* :func:`heads_pass`: one pass over the split giving the accuracy, the (H, H) linear CKA between
  heads (:class:`~fibo.analysis.cka.HeadCKA`) and the attention statistics
  (:class:`~fibo.analysis.stats.AttentionStats`) of every attention module;
* :func:`head_ablation`: the accuracy with each head of each module zeroed, one at a time;
* :func:`cls_attention_maps`: the CLS-to-patch attention of a few inputs on the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from fibo.analysis.cka import HeadCKA
from fibo.analysis.evaluate import accuracy
from fibo.analysis.hooks import AttentionSite, hooks, on_attention_probs, on_head_outputs, zero_head
from fibo.analysis.stats import AttentionStats


def patch_grid(model: torch.nn.Module) -> tuple[int, int]:
    """``(rows, cols)`` of the model's patch grid (``patch_embed.grid_size`` of timm's and fibo's
    patch embeddings).

    Raises:
        ValueError: the model has no ``patch_embed.grid_size``.
    """
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(model).__name__} has no patch_embed.grid_size: cannot place tokens on a patch grid")
    return int(grid[0]), int(grid[1])


@dataclass
class HeadsResult:
    """What :func:`heads_pass` measured: ``accuracy``; per site key: ``cka`` (H, H), ``distance``
    and ``entropy`` (H,), and ``num_tokens`` (patch tokens N of the site's sequences)."""

    accuracy: float
    cka: dict[str, np.ndarray] = field(default_factory=dict)
    distance: dict[str, np.ndarray] = field(default_factory=dict)
    entropy: dict[str, np.ndarray] = field(default_factory=dict)
    num_tokens: dict[str, int] = field(default_factory=dict)


def heads_pass(model: torch.nn.Module, sites: list[AttentionSite], batches: Iterable, device: torch.device,
               grid: tuple[int, int], max_samples: int | None = None) -> HeadsResult:
    """Accuracy, head CKA and attention statistics of ``model`` over ``batches`` in one pass."""
    ckas = {s.key: HeadCKA(s.module.num_heads) for s in sites}
    stats = {s.key: AttentionStats(s.module.num_heads, s.module.num_prefix_tokens, None if s.kind == "temporal" else grid)
             for s in sites}  # temporal attention runs over frames: distances in frames
    tokens: dict[str, int] = {}

    def on_probs(site: AttentionSite) -> Callable:
        def fn(probs: torch.Tensor) -> None:
            tokens[site.key] = probs.shape[-1] - site.module.num_prefix_tokens
            stats[site.key].update(probs)
        return fn

    handles = [on_head_outputs(s.module, ckas[s.key].update) for s in sites]
    handles += [on_attention_probs(s.module, on_probs(s)) for s in sites]
    with hooks(handles):
        acc = accuracy(model, batches, device, max_samples)
    result = HeadsResult(acc, num_tokens=tokens)
    for s in sites:
        result.cka[s.key] = ckas[s.key].matrix().numpy()
        out = stats[s.key].result()
        result.distance[s.key], result.entropy[s.key] = out["distance"].numpy(), out["entropy"].numpy()
    return result


def head_ablation(model: torch.nn.Module, sites: list[AttentionSite], batches: Callable[[], Iterable],
                  device: torch.device, max_samples: int | None = None) -> dict[str, np.ndarray]:
    """Per site key: the accuracies ``(H,)`` with head h zeroed (:func:`~fibo.analysis.hooks.zero_head`),
    every other head intact. ``batches()`` gives a fresh iterable of the split each time."""
    out = {}
    for site in sites:
        accs = []
        for h in range(site.module.num_heads):
            with hooks([zero_head(site.module, h)]):
                accs.append(accuracy(model, batches(), device, max_samples))
        out[site.key] = np.array(accs)
    return out


@torch.no_grad()
def cls_attention_maps(model: torch.nn.Module, sites: list[AttentionSite], inputs: torch.Tensor,
                       device: torch.device, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per site with a CLS token: CLS-to-patch attention ``(rows, H, gh, gw)``: for images one row
    per input; for video (``inputs`` (B, C, T, H, W)) one row per frame of the first input (the CLS
    query of each frame for divided attention; the CLS query over the T x P tokens, cut per frame,
    for joint attention)."""
    video = inputs.ndim == 5
    captured: dict[str, torch.Tensor] = {}
    sites = [s for s in sites if s.module.num_prefix_tokens == 1]

    def keep(site: AttentionSite) -> Callable:
        def fn(probs: torch.Tensor) -> None:
            captured[site.key] = probs[:, :, 0, 1:].float().cpu()  # (B', H, n)
        return fn

    model.eval()
    with hooks([on_attention_probs(s.module, keep(s)) for s in sites]):
        model(inputs.to(device))
    gh, gw = grid
    out = {}
    for key, cls in captured.items():
        heads = cls.shape[1]
        if not video:
            out[key] = cls.reshape(-1, heads, gh, gw).numpy()
        elif cls.shape[0] == inputs.shape[0]:  # joint: (B, H, T*P)
            out[key] = cls[0].reshape(heads, -1, gh, gw).permute(1, 0, 2, 3).numpy()
        else:  # divided / space-only: (B*T, H, P), frames of input 0 first
            out[key] = cls[: inputs.shape[2]].reshape(-1, heads, gh, gw).numpy()
    return out
