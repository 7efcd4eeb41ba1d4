"""The sparse attention patterns the Fibottention paper compares against, as :class:`Pattern` objects.

Same conventions as every pattern (:mod:`fibo.attention.patterns.base`): the CLS row and column are
dense and the pattern applies to the ``N x N`` patch block. Random patterns draw from a local
:class:`torch.Generator` seeded from ``(seed, depth)``; nothing touches a global RNG. Each pattern
takes ``target_density``: when set (a fraction of the ``N x N`` patch block, e.g. ``0.0199`` =
Fibottention's ViT-B density at N=196), its size parameter is chosen so the patch-block density is
as close to it as the parameter allows (FLOP-equivalent comparisons, as in the paper's comparison
table); the density reached is what the layout's ``density()`` reports and what training logs.

Patterns (all bidirectional, as ViTs are; token distance = ``|q - k|`` in patch raster order):

* ``longformer``: sliding window ``|q - k| <= window`` (Beltagy et al. 2020, local attention);
* ``dilated``: one dilation, ``|q - k|`` in ``{0, r, 2r, ...} <= window`` (Longformer's dilated window);
* ``sparse_transformer``: strided (Child et al. 2019), ``|q - k| < stride`` or ``|q - k| % stride == 0``;
* ``bigbird``: window + ``num_global`` global patch tokens (dense row and column) + ``num_random``
  random keys per query and head (Zaheer et al. 2020, token-level rather than block-level);
* ``random``: ``num_keys`` distinct random patch keys per query and head.

The first three are *Toeplitz* (:class:`OffsetPattern`: one offset set, shared by all heads): their
``*_offsets`` functions are the single source of masks, index tables and ``mask_mod``; BigBird and
random are :class:`MaskPattern` (their patch mask is the source).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fibo.attention.patterns.base import MaskPattern, OffsetPattern, check_sizes, toeplitz_pairs

__all__ = ["Longformer", "Dilated", "SparseTransformer", "BigBird", "Random", "longformer_offsets",
           "dilated_offsets", "sparse_transformer_offsets", "toeplitz_density"]


def toeplitz_density(offsets: list[int], num_tokens: int) -> float:
    """Patch-block density of a symmetric Toeplitz pattern: token ``t`` attends ``t +- o`` for
    ``o`` in ``offsets`` (duplicates and offsets ``>= N`` ignored). A value in [0, 1]."""
    return toeplitz_pairs(offsets, num_tokens) / num_tokens**2


def _closest(candidates: list[int], density_of: Callable[[int], float], target: float) -> int:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_density must be in (0, 1], got {target}")
    return min(candidates, key=lambda c: (abs(density_of(c) - target), c))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# ------------------------------------------------------------------ Toeplitz patterns (offsets)

def longformer_offsets(num_tokens: int, window: int = 5, target_density: float | None = None) -> list[int]:
    """Offsets ``0, 1, ..., window`` of a sliding window (``window`` in tokens on each side).

    With ``target_density`` the window (>= 0) whose patch-block density is closest wins.

    Raises:
        ValueError: ``num_tokens < 1``, ``window < 0`` or ``target_density`` outside (0, 1].
    """
    check_sizes(num_tokens, 1)
    if target_density is not None:
        window = _closest(list(range(num_tokens)), lambda w: toeplitz_density(list(range(w + 1)), num_tokens), target_density)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return list(range(window + 1))


def dilated_offsets(num_tokens: int, dilation: int = 2, window: int = 10, target_density: float | None = None) -> list[int]:
    """Offsets ``0, r, 2r, ... <= window`` for dilation ``r`` (the token itself included).

    With ``target_density`` the window (a multiple of ``r``) whose density is closest wins.

    Raises:
        ValueError: ``dilation < 1``, ``window < 0`` or ``target_density`` outside (0, 1].
    """
    check_sizes(num_tokens, 1)
    _check_positive(dilation=dilation)
    if target_density is not None:
        windows = list(range(0, num_tokens, dilation))
        window = _closest(windows, lambda w: toeplitz_density(list(range(0, w + 1, dilation)), num_tokens), target_density)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return list(range(0, window + 1, dilation))


def _strided_pairs(n: int, s: int) -> int:
    # local |o| < s: N + 2 * sum_{o=1}^{s-1} (N - o); strided o = m s, m >= 1: 2 * sum_m (N - m s)
    s_loc = min(s, n)
    local = n + 2 * ((s_loc - 1) * n - s_loc * (s_loc - 1) // 2)
    m = (n - 1) // s if s < n else 0
    strided = 2 * (m * n - s * m * (m + 1) // 2)
    return local + strided


def sparse_transformer_offsets(num_tokens: int, stride: int | None = None, target_density: float | None = None) -> list[int]:
    """Offsets of the strided Sparse Transformer pattern: ``0 .. stride-1`` and every multiple of
    ``stride`` below N. ``stride=None`` means ``round(sqrt(N))`` (the paper's choice, O(N sqrt N)).

    With ``target_density`` the stride whose density is closest wins (closed-form density, so this
    is O(N) even for large N). The density cannot go below about ``2 sqrt(2 / N)`` (18.9% at N=196,
    stride 10): lower targets get that sparsest stride.

    Raises:
        ValueError: ``stride < 1`` or ``target_density`` outside (0, 1].
    """
    check_sizes(num_tokens, 1)
    n = num_tokens
    if target_density is not None:
        stride = _closest(list(range(1, n + 1)), lambda s: _strided_pairs(n, s) / (n * n), target_density)
    elif stride is None:
        stride = max(1, round(math.sqrt(n)))
    _check_positive(stride=stride)
    return sorted(set(range(min(stride, n))) | set(range(stride, n, stride)))


def _generator(seed: int, depth: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(depth))


def _random_keys(num_tokens: int, num_heads: int, num_keys: int, gen: torch.Generator) -> torch.Tensor:
    """(H, N, N) bool with exactly ``min(num_keys, N)`` distinct random keys per row."""
    n = num_tokens
    r = min(max(num_keys, 0), n)
    out = torch.zeros(num_heads, n, n, dtype=torch.bool)
    if r == 0:
        return out
    for h in range(num_heads):  # one head at a time keeps the scratch at N x N floats
        idx = torch.rand(n, n, generator=gen).topk(r, dim=-1).indices
        out[h].scatter_(1, idx, True)
    return out


def _bigbird_patch(n: int, h: int, depth: int, window: int, num_global: int, num_random: int, seed: int) -> torch.Tensor:
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    patch = (dist <= window).expand(h, n, n).clone()
    g = min(num_global, n)
    patch[:, :g, :] = True
    patch[:, :, :g] = True
    return patch | _random_keys(n, h, num_random, _generator(seed, depth))



def _check_target(target: float | None) -> None:
    if target is not None and not 0.0 < target <= 1.0:
        raise ValueError(f"target_density must be in (0, 1], got {target}")


# ------------------------------------------------------------------ the patterns

class Longformer(OffsetPattern):
    """Sliding window (Longformer's local attention, Beltagy et al. 2020): patch ``q`` attends patch
    ``k`` iff ``|q - k| <= window`` (tokens; 0 = the token itself), the same in every head and layer.
    ``target_density`` chooses ``window`` (:func:`longformer_offsets`)."""

    name = "longformer"
    defaults = {"window": 5, "target_density": None}

    def check(self) -> None:
        _check_target(self.options["target_density"])
        if self.options["target_density"] is None and self.options["window"] < 0:
            raise ValueError(f"window must be >= 0, got {self.options['window']}")

    def head_offsets(self, num_tokens, num_heads, depth=0):
        return [longformer_offsets(num_tokens, **self.options)] * num_heads


class Dilated(OffsetPattern):
    """Dilated sliding window with one dilation ``r``: ``|q - k|`` in ``{0, r, 2r, ...}`` and ``<= window``.
    ``target_density`` chooses ``window`` (:func:`dilated_offsets`)."""

    name = "dilated"
    defaults = {"dilation": 2, "window": 10, "target_density": None}

    def check(self) -> None:
        _check_target(self.options["target_density"])
        _check_positive(dilation=self.options["dilation"])

    def head_offsets(self, num_tokens, num_heads, depth=0):
        return [dilated_offsets(num_tokens, **self.options)] * num_heads


class SparseTransformer(OffsetPattern):
    """Strided Sparse Transformer (Child et al. 2019), bidirectional, both sub-patterns in every head:
    ``|q - k| < stride`` or ``|q - k| % stride == 0``; ``stride=None`` = ``round(sqrt(N))``.
    ``target_density`` chooses ``stride`` (:func:`sparse_transformer_offsets`)."""

    name = "sparse_transformer"
    defaults = {"stride": None, "target_density": None}

    def check(self) -> None:
        _check_target(self.options["target_density"])
        if self.options["stride"] is not None:
            _check_positive(stride=self.options["stride"])

    def head_offsets(self, num_tokens, num_heads, depth=0):
        return [sparse_transformer_offsets(num_tokens, **self.options)] * num_heads


class Random(MaskPattern):
    """Every patch query attends ``num_keys`` distinct uniformly drawn patch keys (capped at N), drawn
    independently per head and per layer from ``torch.Generator().manual_seed(seed * 1000003 + depth)``
    (local; the global RNG is untouched). ``target_density`` sets ``num_keys = max(1, round(target * N))``."""

    name = "random"
    defaults = {"num_keys": 8, "seed": 0, "target_density": None}

    def check(self) -> None:
        _check_target(self.options["target_density"])
        if self.options["target_density"] is None:
            _check_positive(num_keys=self.options["num_keys"])

    def patch_mask(self, num_tokens, num_heads, depth=0):
        o = self.options
        num_keys = o["num_keys"] if o["target_density"] is None else max(1, round(o["target_density"] * num_tokens))
        return _random_keys(num_tokens, num_heads, num_keys, _generator(o["seed"], depth))


class BigBird(MaskPattern):
    """BigBird, token-level (Zaheer et al. 2020): sliding window ``|q - k| <= window``, the first
    ``num_global`` patch tokens global (dense row and column), plus ``num_random`` random keys per
    query and head from a local generator seeded by ``(seed, depth)`` (as :class:`Random`).
    ``target_density`` chooses ``num_random`` (window and global tokens stay, so targets below their
    density, 3.6% at N=196 with the defaults, get ``num_random=0``)."""

    name = "bigbird"
    defaults = {"window": 1, "num_global": 2, "num_random": 3, "seed": 0, "target_density": None}

    def check(self) -> None:
        _check_target(self.options["target_density"])
        o = self.options
        if min(o["window"], o["num_global"], o["num_random"]) < 0:
            raise ValueError(f"window, num_global, num_random must be >= 0, got {o['window']}, {o['num_global']}, {o['num_random']}")

    def patch_mask(self, num_tokens, num_heads, depth=0):
        o = self.options

        def patch(r: int) -> torch.Tensor:
            return _bigbird_patch(num_tokens, num_heads, depth, o["window"], o["num_global"], r, o["seed"])

        num_random, target = o["num_random"], o["target_density"]
        if target is not None:
            def density(r: int) -> float:
                return patch(r).float().mean().item()

            lo, hi = 0, num_tokens  # density grows with r: binary search for the closest
            while lo < hi:
                mid = (lo + hi) // 2
                if density(mid) < target:
                    lo = mid + 1
                else:
                    hi = mid
            num_random = min({max(lo - 1, 0), lo}, key=lambda r: (abs(density(r) - target), r))
        return patch(num_random)
