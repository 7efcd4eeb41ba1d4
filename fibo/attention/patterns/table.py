"""A pattern as a CSR index table: the form the fused CPU kernel
(:mod:`fibo.attention.backends.cpu_sparse`) reads. Built by
:meth:`fibo.attention.patterns.base.Layout.table`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["IndexTable", "table_from_mask"]


@dataclass(frozen=True, eq=False)
class IndexTable:
    """A per-head sparsity pattern in CSR form (CPU tensors).

    Attributes:
        row_ptr: ``(H * L + 1,)`` int64; keys of query ``q`` in head ``h`` are
            ``cols[row_ptr[h * L + q] : row_ptr[h * L + q + 1]]``.
        cols: ``(nnz,)`` int32 key indices in ``[0, L)``.
        t_row_ptr, t_cols: the transposed table (queries attending each key); the same tensors when
            the pattern is symmetric.
        num_heads: H. seq_len: L (CLS included).
        build_seconds: wall time it took to build (seconds).
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    t_row_ptr: torch.Tensor
    t_cols: torch.Tensor
    num_heads: int
    seq_len: int
    build_seconds: float = 0.0

    @property
    def nnz(self) -> int:
        """Allowed (query, key) pairs over all heads."""
        return int(self.cols.numel())

    @property
    def density(self) -> float:
        """``nnz / (H L^2)``, the fraction of the full attention matrix computed."""
        return self.nnz / (self.num_heads * self.seq_len**2)

    @property
    def nbytes(self) -> int:
        """Memory held by the table (bytes; a symmetric table shares its transpose)."""
        tensors = {id(t): t for t in (self.row_ptr, self.cols, self.t_row_ptr, self.t_cols)}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def to_mask(self) -> torch.Tensor:
        """The equivalent dense boolean mask ``(H, L, L)`` (for tests and small N only)."""
        h, L = self.num_heads, self.seq_len
        rows = torch.repeat_interleave(torch.arange(h * L), self.row_ptr.diff())
        mask = torch.zeros(h * L, L, dtype=torch.bool)
        mask[rows, self.cols.long()] = True
        return mask.reshape(h, L, L)


def _csr(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = flat.sum(1)
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    cols = flat.nonzero()[:, 1].to(torch.int32).contiguous()
    return row_ptr, cols


def table_from_mask(mask: torch.Tensor) -> IndexTable:
    """CSR table of a boolean mask ``(H, L, L)`` (True = attend); O(H L^2) time and memory.

    Raises:
        ValueError: if the mask is not 3-D square.
    """
    if mask.dim() != 3 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"mask must be (H, L, L), got {tuple(mask.shape)}")
    start = time.perf_counter()
    h, L, _ = mask.shape
    mask = mask.bool().cpu()
    row_ptr, cols = _csr(mask.reshape(h * L, L))
    t_row_ptr, t_cols = _csr(mask.transpose(1, 2).reshape(h * L, L))
    return IndexTable(row_ptr, cols, t_row_ptr, t_cols, h, L, time.perf_counter() - start)
