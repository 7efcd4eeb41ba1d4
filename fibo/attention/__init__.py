"""Attention patterns, backends and the attention module shared by all fibo models.

* where a pattern is defined: :mod:`fibo.attention.patterns` (the registry :data:`PATTERNS`);
* where a backend is chosen: :mod:`fibo.attention.backends` (:func:`choose_backend`);
* the module every model uses: :class:`Attention` (:mod:`fibo.attention.layer`), configured by an
  :class:`AttentionSpec` (:mod:`fibo.attention.spec`).
"""

from fibo.attention.layer import Attention
from fibo.attention.patterns import (
    PATTERNS,
    Pattern,
    fibottention_offsets,
    fibottention_windows,
    head_permutation,
    mask_density,
)
from fibo.attention.spec import AttentionSpec

__all__ = [
    "Attention",
    "AttentionSpec",
    "PATTERNS",
    "Pattern",
    "fibottention_offsets",
    "fibottention_windows",
    "head_permutation",
    "mask_density",
]
