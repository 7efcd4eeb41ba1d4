"""The Pattern protocol: one object per sparse attention pattern, and its layouts at a given size.

A :class:`Pattern` is configured once (its options) and answers, for ``N`` patch tokens, ``H`` heads,
layer ``depth`` and an optional CLS token, with a :class:`Layout`: the one object from which every
representation is derived (like attention-gym's ``mask_mod``-first masks):

* ``head_offsets`` (offset patterns only): the per-head offsets, in head order;
* ``mask()``: the boolean ``(H, L, L)`` mask (``L = N + 1`` with CLS), True = "query may attend key";
* ``mask_mod(device)``: the FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``;
* ``table()``: the sparse backend's CSR :class:`~fibo.attention.patterns.table.IndexTable`;
* ``nnz`` / ``density()``: allowed entries, counted in closed form (offset patterns: O(H |O|), no
  N x N tensor) or from the patch mask (mask patterns).

Conventions shared by every pattern: token 0 is CLS when present, its row and column are dense; the
pattern applies to the ``N x N`` patch block. Edge rules live here, once: offsets outside ``[0, N)``
connect nothing, duplicate offsets count once, offset 0 is the token itself, and a patch row left
without any key (possible only without CLS) attends itself (:func:`rows_attending_self`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from fibo.attention.patterns.table import IndexTable, table_from_mask

__all__ = ["Pattern", "OffsetPattern", "MaskPattern", "Layout", "OffsetLayout", "MaskLayout", "DenseLayout",
           "rows_attending_self", "toeplitz_pairs", "mask_density", "check_sizes"]


def check_sizes(num_tokens: int, num_heads: int) -> None:
    """Raises ``ValueError`` unless ``num_tokens >= 1`` (patch tokens, CLS excluded) and ``num_heads >= 1``."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens (patch tokens, CLS excluded) must be >= 1, got {num_tokens}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")


def toeplitz_pairs(offsets, num_tokens: int) -> int:
    """(query, key) pairs of an ``N x N`` block with ``|q - k|`` in ``offsets`` (duplicates count once,
    offsets outside ``[0, N)`` connect nothing): ``N`` for offset 0, ``2 (N - o)`` for ``o > 0``."""
    n = num_tokens
    return sum((n - o) * (1 if o == 0 else 2) for o in set(offsets) if 0 <= o < n)


def rows_attending_self(has_key, cls_token: bool):
    """The empty-row rule, the one place it is decided: a patch query row with no allowed key
    attends itself (its diagonal entry), so no softmax row is empty. With a CLS token every row has
    the CLS key and no row needs it.

    Args:
        has_key: ``(H, N)`` bool (NumPy array or tensor): does patch row ``t`` of head ``h`` have a patch key?
        cls_token: a CLS token is present.

    Returns:
        ``(H, N)`` bool of the same kind: the rows that get their diagonal entry.
    """
    return has_key & False if cls_token else ~has_key


def mask_density(mask: torch.Tensor, cls_token: bool = True) -> dict[str, float]:
    """Fraction of allowed entries of a boolean mask ``(H, L, L)``: ``density`` over the whole mask
    and ``density_patch`` over the N x N patch block (equal when there is no CLS token); in [0, 1]."""
    mask = mask.bool()
    patch = mask[..., 1:, 1:] if cls_token else mask
    return {"density": mask.float().mean().item(), "density_patch": patch.float().mean().item()}


def _with_cls(patch: torch.Tensor, cls_token: bool) -> torch.Tensor:
    if not cls_token:
        return patch
    h, n, _ = patch.shape
    mask = torch.ones(h, n + 1, n + 1, dtype=torch.bool)
    mask[:, 1:, 1:] = patch
    return mask


# ------------------------------------------------------------------ layouts (a pattern at one size)

class Layout:
    """A pattern at one size: ``num_heads`` H, ``num_tokens`` N patch tokens, ``cls_token``.

    Subclasses implement :meth:`mask`, :meth:`table`, :meth:`mask_mod` and :attr:`patch_nnz`;
    :attr:`nnz`, :meth:`density` and the CLS accounting are shared.
    """

    head_offsets: list[list[int]] | None = None
    is_dense = False

    def __init__(self, num_heads: int, num_tokens: int, cls_token: bool) -> None:
        check_sizes(num_tokens, num_heads)
        self.num_heads, self.num_tokens, self.cls_token = int(num_heads), int(num_tokens), bool(cls_token)
        self.seq_len = self.num_tokens + int(self.cls_token)

    @property
    def patch_nnz(self) -> int:
        """Allowed (query, key) pairs inside the N x N patch blocks, summed over heads."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Allowed (query, key) pairs of the whole ``(H, L, L)`` pattern: the patch block plus, with CLS,
        the dense CLS row (L keys) and column (N patch queries) of every head."""
        h, n, L = self.num_heads, self.num_tokens, self.seq_len
        return self.patch_nnz + (h * (L + n) if self.cls_token else 0)

    def density(self) -> dict[str, float]:
        """``density`` = nnz / (H L^2) and ``density_patch`` = patch nnz / (H N^2), both in [0, 1]."""
        h, n, L = self.num_heads, self.num_tokens, self.seq_len
        return {"density": self.nnz / (h * L * L), "density_patch": self.patch_nnz / (h * n * n)}

    def mask(self) -> torch.Tensor | None:
        """CPU bool ``(H, L, L)``, True = attend (``None`` for dense). Built on every call: cache it."""
        raise NotImplementedError

    def table(self) -> IndexTable:
        """The CSR index table over the ``H * L`` query rows (sorted keys per row)."""
        raise NotImplementedError

    def mask_mod(self, device: torch.device | str) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> BoolTensor``, its lookup tensors on ``device``.
        Indices beyond ``L`` (block padding) are clamped into range."""
        raise NotImplementedError


class DenseLayout(Layout):
    """Every query attends every key: no mask, no table."""

    is_dense = True

    @property
    def patch_nnz(self) -> int:
        return self.num_heads * self.num_tokens**2

    def mask(self) -> None:
        return None

    def table(self) -> IndexTable:
        raise ValueError("the dense pattern has no index table")

    def mask_mod(self, device):
        raise ValueError("the dense pattern has no block mask")


class OffsetLayout(Layout):
    """A symmetric Toeplitz pattern: patch token ``t`` of head ``h`` attends ``t +- o`` for every ``o``
    in ``head_offsets[h]`` inside ``[0, N)``. Nothing of size N x N is held: the distances per head and
    the rows that attend themselves (:func:`rows_attending_self`), O(H N).

    Args:
        head_offsets: per head (in head order) the pattern's offsets as the pattern defines them
            (duplicates and offsets ``>= N`` allowed; they count once / connect nothing).
        num_tokens: N. cls_token: prepend a dense CLS row/column.
    """

    def __init__(self, head_offsets: list[list[int]], num_tokens: int, cls_token: bool = True) -> None:
        super().__init__(len(head_offsets), num_tokens, cls_token)
        n = self.num_tokens
        self.head_offsets = [list(map(int, offs)) for offs in head_offsets]
        self.distances = [sorted({o for o in offs if 0 <= o < n}) for offs in self.head_offsets]
        # row t has a patch key iff some distance d reaches inside [0, N): d <= max(t, N - 1 - t)
        reach = np.maximum(np.arange(n), n - 1 - np.arange(n))
        has_key = np.stack([reach >= d[0] if d else np.zeros(n, dtype=bool) for d in self.distances])
        self.self_rows = rows_attending_self(has_key, self.cls_token)  # (H, N) bool

    @property
    def patch_nnz(self) -> int:
        return sum(toeplitz_pairs(d, self.num_tokens) for d in self.distances) + int(self.self_rows.sum())

    def _lut(self, width: int) -> torch.Tensor:
        """``(H, width)`` bool: is distance ``d`` allowed in head ``h`` (``width > N`` leaves the tail False)."""
        lut = torch.zeros(self.num_heads, width, dtype=torch.bool)
        for h, dist in enumerate(self.distances):
            if dist:
                lut[h, dist] = True
        return lut

    def mask(self) -> torch.Tensor:
        n = self.num_tokens
        distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()  # (N, N)
        patch = self._lut(n)[:, distance]  # (H, N, N)
        if self.self_rows.any():
            patch |= torch.eye(n, dtype=torch.bool) & torch.from_numpy(self.self_rows)[..., None]
        return _with_cls(patch, self.cls_token)

    def table(self) -> IndexTable:
        """O(N sum_h |O_h|) time and memory (NumPy; no mask). Symmetric: the transpose is the table."""
        start = time.perf_counter()
        n, c, L = self.num_tokens, int(self.cls_token), self.seq_len
        t = np.arange(n, dtype=np.int64)
        all_counts, all_cols = [], []
        for dist, self_row in zip(self.distances, self.self_rows):
            signed = np.array(sorted(set(dist) | {-d for d in dist} | {0}), dtype=np.int64)
            keys = t[:, None] + signed[None, :]  # (N, |S|)
            valid = (keys >= 0) & (keys < n)
            if 0 not in dist:  # offset 0 is not part of the pattern: the diagonal only where the rule puts it
                valid[:, int(np.searchsorted(signed, 0))] = self_row
            if c:  # CLS row: every key; patch rows: CLS first, then their patch keys (shifted by one)
                keys = np.concatenate([np.full((n, 1), -1, dtype=np.int64), keys], 1) + 1
                valid = np.concatenate([np.ones((n, 1), dtype=bool), valid], 1)
                all_counts += [np.array([L]), valid.sum(1)]
                all_cols += [np.arange(L), keys[valid]]
            else:
                all_counts.append(valid.sum(1))
                all_cols.append(keys[valid])
        counts = np.concatenate(all_counts)
        row_ptr = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=row_ptr[1:])
        row_ptr = torch.from_numpy(row_ptr)
        cols = torch.from_numpy(np.concatenate(all_cols).astype(np.int32))
        # symmetric: |q - k| patterns, a dense CLS row *and* column, self only on the diagonal
        return IndexTable(row_ptr, cols, row_ptr, cols, self.num_heads, L, time.perf_counter() - start)

    def mask_mod(self, device: torch.device | str) -> Callable:
        n, c, last = self.num_tokens, int(self.cls_token), self.seq_len - 1
        lut = self._lut(n + 1).to(device)  # distance N stands for "involves CLS": never allowed by the lut
        self_rows = torch.zeros(self.num_heads, self.seq_len, dtype=torch.bool)
        self_rows[:, c:] = torch.from_numpy(self.self_rows)
        self_rows = self_rows.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = q_idx.clamp(0, last), kv_idx.clamp(0, last)
            dist = (qi - ki).abs().clamp(max=n)
            ok = lut[h, dist] | (self_rows[h, qi] & (qi == ki))
            if c:  # the CLS row and column are dense
                ok = ok | (qi == 0) | (ki == 0)
            return ok

        return mask_mod


class MaskLayout(Layout):
    """A pattern given by its ``(H, N, N)`` patch mask (BigBird, random): every representation is
    derived from that mask, after :func:`rows_attending_self` is applied to it once."""

    def __init__(self, patch: torch.Tensor, cls_token: bool = True) -> None:
        if patch.dim() != 3 or patch.shape[-1] != patch.shape[-2]:
            raise ValueError(f"a patch mask must be (H, N, N), got {tuple(patch.shape)}")
        super().__init__(patch.shape[0], patch.shape[-1], cls_token)
        patch = patch.bool()
        self_rows = rows_attending_self(patch.any(-1), self.cls_token)
        if self_rows.any():
            patch = patch | (torch.eye(self.num_tokens, dtype=torch.bool) & self_rows[..., None])
        self.patch = patch

    @property
    def patch_nnz(self) -> int:
        return int(self.patch.sum())

    def mask(self) -> torch.Tensor:
        return _with_cls(self.patch, self.cls_token)

    def table(self) -> IndexTable:
        return table_from_mask(self.mask())

    def mask_mod(self, device: torch.device | str) -> Callable:
        mask, last = self.mask().to(device), self.seq_len - 1

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[h, q_idx.clamp(0, last), kv_idx.clamp(0, last)]

        return mask_mod


# ------------------------------------------------------------------ patterns (configured, size-free)

def _check_option_type(pattern: str, key: str, value: Any, default: Any) -> None:
    """An option has the type of its default: bool stays bool (``bool("no")`` would be True), int
    stays int, float accepts int; a ``None`` default accepts a number or None."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float) or default is None:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        want = "a number or null"
    else:
        ok, want = True, ""
    if not ok:
        raise ValueError(f"attention.{key}={value!r} must be {want} (attention={pattern})")


class Pattern:
    """A sparse attention pattern with its options (``Pattern(**options)``); size-free. Treat
    :attr:`options` (every option, defaults filled in) as read-only.

    Subclasses set :attr:`name` and :attr:`defaults` (option -> default value, whose type is the
    option's type) and implement :meth:`layout`. The registry of all patterns is
    :data:`fibo.attention.patterns.PATTERNS`.

    Raises:
        ValueError: an unknown option, or an option of the wrong type (one line naming it).
    """

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, Any]] = {}
    is_dense: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"attention={self.name} has no option(s) {unknown}; its options are {sorted(self.defaults)}")
        for key, value in options.items():
            _check_option_type(self.name, key, value, self.defaults[key])
        self.options: dict[str, Any] = {**self.defaults, **options}  # read-only by convention (picklable)
        self.check()

    def check(self) -> None:
        """Size-free validation of the options (raise ``ValueError``); default: nothing to check."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def layout(self, num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True) -> Layout:
        """The pattern at ``N = num_tokens`` patch tokens, ``H = num_heads``, layer ``depth``.

        Raises:
            ValueError: on non-positive sizes or options that do not fit this size.
        """
        raise NotImplementedError

    def mask(self, num_tokens: int, num_heads: int, depth: int = 0, cls_token: bool = True) -> torch.Tensor | None:
        """Shorthand for ``layout(...).mask()``: CPU bool ``(H, L, L)`` or ``None`` for dense."""
        return self.layout(num_tokens, num_heads, depth, cls_token).mask()


class OffsetPattern(Pattern):
    """A pattern given by per-head offsets (Fibottention, Longformer, dilated, Sparse Transformer)."""

    def head_offsets(self, num_tokens: int, num_heads: int, depth: int = 0) -> list[list[int]]:
        """Per-head offsets in head order (layer ``depth``)."""
        raise NotImplementedError

    def layout(self, num_tokens, num_heads, depth=0, cls_token=True) -> OffsetLayout:
        check_sizes(num_tokens, num_heads)
        return OffsetLayout(self.head_offsets(int(num_tokens), int(num_heads), int(depth)), num_tokens, cls_token)


class MaskPattern(Pattern):
    """A pattern given by its ``(H, N, N)`` patch mask (BigBird, random)."""

    def patch_mask(self, num_tokens: int, num_heads: int, depth: int = 0) -> torch.Tensor:
        """CPU bool ``(H, N, N)`` of layer ``depth``, before the empty-row rule."""
        raise NotImplementedError

    def layout(self, num_tokens, num_heads, depth=0, cls_token=True) -> MaskLayout:
        check_sizes(num_tokens, num_heads)
        return MaskLayout(self.patch_mask(int(num_tokens), int(num_heads), int(depth)), cls_token)


class Dense(Pattern):
    """Dense attention: every query attends every key (no mask, no table)."""

    name = "dense"
    is_dense = True

    def layout(self, num_tokens, num_heads, depth=0, cls_token=True) -> DenseLayout:
        return DenseLayout(num_heads, num_tokens, cls_token)
