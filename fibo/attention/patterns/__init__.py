"""Where every attention pattern is defined: :data:`PATTERNS`, the one registry of
:class:`~fibo.attention.patterns.base.Pattern` classes (``name -> class``).

``PATTERNS[name](**options)`` is a configured pattern; ``.layout(N, H, depth, cls_token)`` gives its
per-head offsets (offset patterns), mask, FlexAttention ``mask_mod``, index table and density
(:mod:`fibo.attention.patterns.base`). Fibottention lives in :mod:`.fibottention`, the paper's
comparison patterns in :mod:`.baselines`.
"""

from __future__ import annotations

from fibo.attention.patterns.base import (
    Dense,
    Layout,
    MaskPattern,
    OffsetPattern,
    Pattern,
    mask_density,
    rows_attending_self,
)
from fibo.attention.patterns.baselines import BigBird, Dilated, Longformer, Random, SparseTransformer
from fibo.attention.patterns.fibottention import (
    Fibottention,
    fibottention_offsets,
    fibottention_windows,
    head_permutation,
    wythoff_pair,
)
from fibo.attention.patterns.table import IndexTable

#: name -> Pattern class; ``dense`` and ``fibottention`` first (the main comparison), then the
#: paper's baselines.
PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (Dense, Fibottention, Longformer, BigBird, SparseTransformer, Random, Dilated)
}
MAIN_PATTERNS = ("dense", "fibottention")

__all__ = ["PATTERNS", "MAIN_PATTERNS", "Pattern", "OffsetPattern", "MaskPattern", "Layout", "Dense",
           "Fibottention", "Longformer", "BigBird", "SparseTransformer", "Random", "Dilated", "IndexTable",
           "mask_density", "rows_attending_self", "fibottention_offsets", "fibottention_windows",
           "head_permutation", "wythoff_pair"]
