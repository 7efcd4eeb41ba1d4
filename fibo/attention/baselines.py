"""The sparse attention patterns the Fibottention paper compares against, as pure mask builders.

Every builder has the signature of :func:`fibo.attention.patterns.fibottention_mask`::

    f(num_tokens, num_heads, depth=0, cls_token=True, **options) -> BoolTensor (H, N+1, N+1)

(``(H, N, N)`` without CLS), True = "query may attend key", with the same CLS convention as
Fibottention: the CLS row and column are dense and the pattern applies to the ``N x N`` patch block.
Random patterns draw from a local :class:`torch.Generator` seeded from ``(seed, depth)``; no builder
touches a global RNG. Each builder takes ``target_density``: when set (a fraction of the ``N x N``
patch block, e.g. ``0.0199`` = Fibottention's ViT-B density at N=196), the pattern's size parameter
is chosen so the patch-block density is as close to it as the parameter allows (FLOP-equivalent
comparisons, as in the paper's comparison table); the density reached is what
:func:`fibo.attention.patterns.mask_density` reports and what training logs.

Patterns (all bidirectional, as ViTs are; token distance = ``|q - k|`` in patch raster order):

* ``longformer``: sliding window ``|q - k| <= window`` (Beltagy et al. 2020, local attention);
* ``dilated``: one dilation, ``|q - k|`` in ``{0, r, 2r, ...} <= window`` (Longformer's dilated window);
* ``sparse_transformer``: strided (Child et al. 2019), ``|q - k| < stride`` or ``|q - k| % stride == 0``;
* ``bigbird``: window + ``num_global`` global patch tokens (dense row and column) + ``num_random``
  random keys per query and head (Zaheer et al. 2020, token-level rather than block-level);
* ``random``: ``num_keys`` distinct random patch keys per query and head.

The first three are *Toeplitz* (one offset set per head, like Fibottention): their ``*_offsets``
functions are the single source of both the masks and the sparse backend's index tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch

from fibo.attention.patterns import _check_sizes, offsets_to_mask

__all__ = [
    "longformer_mask",
    "dilated_mask",
    "sparse_transformer_mask",
    "bigbird_mask",
    "random_mask",
    "longformer_offsets",
    "dilated_offsets",
    "sparse_transformer_offsets",
    "toeplitz_density",
]


def toeplitz_density(offsets: list[int], num_tokens: int) -> float:
    """Patch-block density of a symmetric Toeplitz pattern: token ``t`` attends ``t +- o`` for
    ``o`` in ``offsets`` (duplicates and offsets ``>= N`` ignored). A value in [0, 1]."""
    n = num_tokens
    pairs = sum((n - o) * (1 if o == 0 else 2) for o in set(offsets) if 0 <= o < n)
    return pairs / (n * n)


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
    _check_sizes(num_tokens, 1)
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
    _check_sizes(num_tokens, 1)
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
    _check_sizes(num_tokens, 1)
    n = num_tokens
    if target_density is not None:
        stride = _closest(list(range(1, n + 1)), lambda s: _strided_pairs(n, s) / (n * n), target_density)
    elif stride is None:
        stride = max(1, round(math.sqrt(n)))
    _check_positive(stride=stride)
    return sorted(set(range(min(stride, n))) | set(range(stride, n, stride)))


# ------------------------------------------------------------------ mask builders

def _with_cls(patch: torch.Tensor, cls_token: bool) -> torch.Tensor:
    if not cls_token:
        return patch
    h, n, _ = patch.shape
    mask = torch.ones(h, n + 1, n + 1, dtype=torch.bool)
    mask[:, 1:, 1:] = patch
    return mask


@lru_cache(maxsize=64)
def _toeplitz_cached(offsets: tuple[int, ...], num_tokens: int, num_heads: int, cls_token: bool) -> torch.Tensor:
    return offsets_to_mask([list(offsets)] * num_heads, num_tokens, cls_token=cls_token)


def longformer_mask(num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True,
                    window: int = 5, target_density: float | None = None) -> torch.Tensor:
    """Sliding-window (Longformer local) mask: patch ``q`` attends patch ``k`` iff ``|q - k| <= window``.

    Args:
        num_tokens: N patch tokens; num_heads: H (all heads share the pattern); depth: unused (the
            pattern does not change with the layer); cls_token: prepend a dense CLS row/column.
        window: half-width in tokens (``0`` = the token itself only).
        target_density: if set, choose ``window`` to match this patch-block density.

    Returns:
        ``(H, N+1, N+1)`` bool (``(H, N, N)`` without CLS). Cached: do not modify in place.

    Raises:
        ValueError: on non-positive sizes, ``window < 0``, ``target_density`` outside (0, 1].
    """
    _check_sizes(num_tokens, num_heads)
    offs = longformer_offsets(num_tokens, window, target_density)
    return _toeplitz_cached(tuple(offs), num_tokens, num_heads, bool(cls_token))


def dilated_mask(num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True,
                 dilation: int = 2, window: int = 10, target_density: float | None = None) -> torch.Tensor:
    """Dilated sliding window with one dilation: ``|q - k|`` in ``{0, r, 2r, ...}`` and ``<= window``.

    Args: as :func:`longformer_mask`, plus ``dilation`` (r >= 1, in tokens); ``target_density``
    chooses ``window``.

    Returns / Raises: as :func:`longformer_mask` (also ``ValueError`` for ``dilation < 1``).
    """
    _check_sizes(num_tokens, num_heads)
    offs = dilated_offsets(num_tokens, dilation, window, target_density)
    return _toeplitz_cached(tuple(offs), num_tokens, num_heads, bool(cls_token))


def sparse_transformer_mask(num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True,
                            stride: int | None = None, target_density: float | None = None) -> torch.Tensor:
    """Strided Sparse Transformer mask (Child et al. 2019, bidirectional, both sub-patterns merged in
    every head): ``|q - k| < stride`` or ``|q - k| % stride == 0``.

    Args: as :func:`longformer_mask`, plus ``stride`` (None = ``round(sqrt(N))``); ``target_density``
    chooses ``stride``.

    Returns / Raises: as :func:`longformer_mask` (``ValueError`` for ``stride < 1``).
    """
    _check_sizes(num_tokens, num_heads)
    offs = sparse_transformer_offsets(num_tokens, stride, target_density)
    return _toeplitz_cached(tuple(offs), num_tokens, num_heads, bool(cls_token))


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


@lru_cache(maxsize=64)
def _random_cached(num_tokens, num_heads, depth, cls_token, num_keys, seed):
    return _with_cls(_random_keys(num_tokens, num_heads, num_keys, _generator(seed, depth)), cls_token)


def random_mask(num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True,
                num_keys: int = 8, seed: int = 0, target_density: float | None = None) -> torch.Tensor:
    """Random pattern: every patch query attends ``num_keys`` distinct uniformly drawn patch keys,
    drawn independently per head and per layer from ``torch.Generator().manual_seed(seed * 1000003 +
    depth)`` (local; the global RNG is untouched).

    Args: as :func:`longformer_mask`, plus ``num_keys`` (keys per query, capped at N) and ``seed``;
    ``target_density`` sets ``num_keys = max(1, round(target_density * N))``.

    Returns / Raises: as :func:`longformer_mask` (``ValueError`` for ``num_keys < 1``).
    """
    _check_sizes(num_tokens, num_heads)
    if target_density is not None:
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        num_keys = max(1, round(target_density * num_tokens))
    _check_positive(num_keys=num_keys)
    return _random_cached(int(num_tokens), int(num_heads), int(depth), bool(cls_token), int(num_keys), int(seed))


def _bigbird_patch(n: int, h: int, depth: int, window: int, num_global: int, num_random: int, seed: int) -> torch.Tensor:
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    patch = (dist <= window).expand(h, n, n).clone()
    g = min(num_global, n)
    patch[:, :g, :] = True
    patch[:, :, :g] = True
    return patch | _random_keys(n, h, num_random, _generator(seed, depth))


@lru_cache(maxsize=64)
def _bigbird_cached(num_tokens, num_heads, depth, cls_token, window, num_global, num_random, seed):
    return _with_cls(_bigbird_patch(num_tokens, num_heads, depth, window, num_global, num_random, seed), cls_token)


def bigbird_mask(num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True,
                 window: int = 1, num_global: int = 2, num_random: int = 3, seed: int = 0,
                 target_density: float | None = None) -> torch.Tensor:
    """BigBird (token-level): sliding window ``|q - k| <= window``, the first ``num_global`` patch
    tokens global (dense row and column), plus ``num_random`` random keys per query and head from a
    local generator seeded by ``(seed, depth)`` (as :func:`random_mask`).

    Args: as :func:`longformer_mask`, plus ``window`` (>= 0), ``num_global`` (>= 0), ``num_random``
    (>= 0), ``seed``; ``target_density`` chooses ``num_random`` (the window and global tokens stay,
    so targets below their density, 3.6% at N=196 with the defaults, get ``num_random=0``).

    Returns / Raises: as :func:`longformer_mask` (``ValueError`` for negative parameters).
    """
    _check_sizes(num_tokens, num_heads)
    if min(window, num_global, num_random) < 0:
        raise ValueError(f"window, num_global, num_random must be >= 0, got {window}, {num_global}, {num_random}")
    args = (int(num_tokens), int(num_heads), int(depth))
    if target_density is not None:
        def density(r: int) -> float:
            m = _bigbird_patch(*args, window, num_global, r, seed)
            return m.float().mean().item()
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        lo, hi = 0, num_tokens  # density grows with r: binary search for the closest
        while lo < hi:
            mid = (lo + hi) // 2
            if density(mid) < target_density:
                lo = mid + 1
            else:
                hi = mid
        num_random = min({max(lo - 1, 0), lo}, key=lambda r: (abs(density(r) - target_density), r))
    return _bigbird_cached(*args, bool(cls_token), int(window), int(num_global), int(num_random), int(seed))


#: Toeplitz patterns: name -> ``f(num_tokens, num_heads, depth, **options) -> per-head offsets``
#: (head order as in the mask), used by the sparse backend to build index tables in O(N |O|)
#: without an N x N mask.
def _fibottention_head_offsets(num_tokens, num_heads, depth=0, modified=False, w_min=5, w_max=None,
                               permute_heads_per_layer=True):
    from fibo.attention.patterns import fibottention_offsets, head_permutation

    offs = fibottention_offsets(num_tokens, num_heads, w_min=w_min, w_max=w_max, modified=modified)
    if permute_heads_per_layer:
        offs = [offs[j] for j in head_permutation(num_heads, depth)]
    return offs


TOEPLITZ_OFFSETS: dict[str, Callable[..., list[list[int]]]] = {
    "fibottention": _fibottention_head_offsets,
    "longformer": lambda num_tokens, num_heads, depth=0, **o: [longformer_offsets(num_tokens, **o)] * num_heads,
    "dilated": lambda num_tokens, num_heads, depth=0, **o: [dilated_offsets(num_tokens, **o)] * num_heads,
    "sparse_transformer": lambda num_tokens, num_heads, depth=0, **o: [sparse_transformer_offsets(num_tokens, **o)] * num_heads,
}

BASELINE_PATTERNS: dict[str, Callable[..., torch.Tensor]] = {
    "longformer": longformer_mask,
    "bigbird": bigbird_mask,
    "sparse_transformer": sparse_transformer_mask,
    "random": random_mask,
    "dilated": dilated_mask,
}
