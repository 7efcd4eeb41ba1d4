"""Forward hooks on fibo's :class:`~fibo.attention.Attention` modules: find them, read each head's
output, zero one head, recompute the attention probabilities.

Only the module's public attributes are used: ``qkv``, ``proj``, ``num_heads``, ``head_dim``,
``num_prefix_tokens``, ``layer_index`` and ``get_mask(n, device)`` (plus ``spec.mask_semantics``
where present). The head outputs are the input of ``attn.proj`` (``(B, L, C)``, head h =
columns ``h*head_dim:(h+1)*head_dim``, as ``Attention.forward`` concatenates them); the
probabilities are recomputed from the output of ``attn.qkv`` split as ``Attention.forward`` does.
They do not depend on the backend that computed the forward pass (SDPA, sparse kernel, Flex).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fibo.attention import Attention


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model: its module ``name`` (``blocks.3.attn``), a metric ``key``
    (``layer_3``; TimeSformer's temporal attention ``temporal_layer_3``), its ``kind``
    (``spatial`` for image/spatial/joint attention, ``temporal``) and the module."""

    name: str
    key: str
    kind: str
    module: Attention


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every :class:`~fibo.attention.Attention` in ``model`` (``named_modules`` order).

    Raises:
        ValueError: the model has none.
    """
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            kind = "temporal" if name.split(".")[-1].startswith("temporal") else "spatial"
            key = f"{'temporal_' if kind == 'temporal' else ''}layer_{module.layer_index}"
            sites.append(AttentionSite(name, key, kind, module))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no fibo.attention.Attention module to analyse")
    return sites


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Removes the given hook handles on leaving."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def on_head_outputs(attn: Attention, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(z)`` with the head outputs ``z`` (B, L, H * head_dim) of every forward (a forward
    pre-hook on ``attn.proj``). Returns the hook handle."""
    return attn.proj.register_forward_pre_hook(lambda _m, args: fn(args[0]))


def zero_head(attn: Attention, head: int):
    """Zero head ``head``'s slice of ``attn.proj``'s input (removes the head's contribution; the
    other heads and ``proj``'s bias are untouched). Returns the hook handle.

    Raises:
        ValueError: ``head`` out of range.
    """
    if not 0 <= head < attn.num_heads:
        raise ValueError(f"head {head} out of range: the module has {attn.num_heads} heads")
    lo, hi = head * attn.head_dim, (head + 1) * attn.head_dim

    def pre_hook(_module, args):
        z = args[0].clone()
        z[..., lo:hi] = 0
        return (z, *args[1:])

    return attn.proj.register_forward_pre_hook(pre_hook)


def attention_probs(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``(B, H, L, L)`` from the output ``qkv`` (B, L, 3C) of ``attn.qkv``:
    ``softmax(q k^T * head_dim**-0.5)`` with ``attn.get_mask(N, device)``'s masked entries excluded
    (``-inf``, so they are exactly 0 and every row sums to 1) or, for ``mask_semantics=zero_score``
    (the authors' code), multiplied by the 0/1 mask before the softmax. Computed in float32."""
    B, L, _ = qkv.shape
    H, d = attn.num_heads, attn.head_dim
    q, k, _ = qkv.float().reshape(B, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, d)
    scores = (q @ k.transpose(-2, -1)) * d ** -0.5
    mask = attn.get_mask(L - attn.num_prefix_tokens, qkv.device)
    if mask is not None:
        semantics = getattr(getattr(attn, "spec", None), "mask_semantics", "neg_inf")
        if semantics == "zero_score":
            scores = scores * mask.to(scores.dtype)
        else:
            scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def on_attention_probs(attn: Attention, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(probs)`` with :func:`attention_probs` (B, H, L, L) of every forward (a forward hook
    on ``attn.qkv``). Returns the hook handle."""
    return attn.qkv.register_forward_hook(lambda _m, _args, out: fn(attention_probs(attn, out)))
