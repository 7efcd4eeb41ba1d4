"""Attention patterns, backends and the attention module shared by all fibo models."""

from fibo.attention.layer import Attention
from fibo.attention.patterns import (
    fibottention_mask,
    fibottention_offsets,
    fibottention_windows,
    head_permutation,
    mask_density,
)
from fibo.attention.spec import PATTERNS, AttentionSpec

__all__ = [
    "Attention",
    "AttentionSpec",
    "PATTERNS",
    "fibottention_mask",
    "fibottention_offsets",
    "fibottention_windows",
    "head_permutation",
    "mask_density",
]
