"""Truly sparse attention on the CPU: per-head index tables and a fused C++ kernel.

Cost: time and memory grow with ``sum_i N * |O_i|`` (the keys each query may attend), forward and
backward; the ``L x L`` score matrix and the gathered keys are never materialised.

* :class:`IndexTable`: the pattern as a CSR table over the ``H * L`` query rows (``L = N + 1`` with
  CLS): the CLS query row lists every key, every patch row lists CLS (when present) and its allowed
  patch keys; a transposed table (queries per key) drives the backward pass. For the Toeplitz
  patterns (Fibottention, Longformer, dilated, Sparse Transformer) it is built from the per-head
  offsets in ``O(N |O|)`` time and memory; other patterns (BigBird, random) derive it from their
  mask. Tables are cached per (pattern, N, H, depth, CLS).
* :func:`sparse_attention`: ``softmax(q k^T / sqrt(d) + mask) v`` with ``-inf`` semantics through
  the C++ kernel in :mod:`fibo.attention._sparse_cpu_src`, compiled at first use with
  :func:`torch.utils.cpp_extension.load_inline` (cached under ``$TORCH_EXTENSIONS_DIR`` or
  ``~/.cache/torch_extensions``; needs a C++ compiler and ``ninja``) and wrapped in an autograd
  function whose backward recomputes the probabilities from the saved log-sum-exp.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from fibo.attention._sparse_cpu_src import CPP_SOURCE
from fibo.attention.baselines import TOEPLITZ_OFFSETS

log = logging.getLogger(__name__)

__all__ = ["IndexTable", "index_table", "table_from_mask", "table_from_offsets", "sparse_attention",
           "load_extension", "extension_available"]


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


def table_from_offsets(head_offsets: list[list[int]], num_tokens: int, cls_token: bool = True) -> IndexTable:
    """CSR table of a symmetric Toeplitz pattern without building a mask: O(N sum_i |O_i|).

    Patch token ``t`` of head ``h`` attends ``t +- o`` for ``o`` in ``head_offsets[h]`` inside
    ``[0, N)`` (duplicates once, offsets ``>= N`` connect nothing); with ``cls_token`` the CLS
    row and column (index 0) are dense. A row left without any key (possible only without CLS) gets
    its own token, exactly as :meth:`fibo.attention.spec.AttentionSpec.mask` does. Keys are sorted.

    Raises:
        ValueError: on ``num_tokens < 1`` or an empty head list.
    """
    if num_tokens < 1 or not head_offsets:
        raise ValueError(f"need num_tokens >= 1 and at least one head, got {num_tokens}, {len(head_offsets)} heads")
    start = time.perf_counter()
    n, c = num_tokens, int(bool(cls_token))
    L = n + c
    t = np.arange(n, dtype=np.int64)  # NumPy: single-threaded, no parallel-region latency on small ops
    all_counts, all_cols = [], []
    for offs in head_offsets:
        valid_o = sorted({int(o) for o in offs if 0 <= o < n})
        signed = np.array(sorted(set(valid_o) | {-o for o in valid_o} | {0}), dtype=np.int64)
        keys = t[:, None] + signed[None, :]  # (N, |S|)
        valid = (keys >= 0) & (keys < n)
        zero_col = int(np.searchsorted(signed, 0))
        if 0 not in valid_o:  # offset 0 is not part of the pattern: only for rows left empty
            valid[:, zero_col] = False
            if not c:
                valid[:, zero_col] = ~valid.any(1)
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
    return IndexTable(row_ptr, cols, row_ptr, cols, len(head_offsets), L, time.perf_counter() - start)


def _freeze(options: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


@lru_cache(maxsize=256)
def _index_table_cached(name: str, options: tuple, num_tokens: int, num_heads: int, depth: int, cls_token: bool) -> IndexTable:
    opts = dict(options)
    if name in TOEPLITZ_OFFSETS:
        offsets = TOEPLITZ_OFFSETS[name](num_tokens, num_heads, depth, **opts)
        return table_from_offsets(offsets, num_tokens, cls_token)
    from fibo.attention.spec import AttentionSpec

    spec = AttentionSpec(name=name, options=opts)
    return table_from_mask(spec.mask(num_tokens, num_heads, depth, cls_token=cls_token))


def index_table(name: str, options: Mapping[str, Any], num_tokens: int, num_heads: int, depth: int = 0,
                cls_token: bool = True) -> IndexTable:
    """The (cached) index table of pattern ``name`` with builder ``options`` for ``N = num_tokens``
    patch tokens, ``H = num_heads``, layer ``depth``. Same pattern as the spec's mask, row for row.

    Raises:
        ValueError: for the ``dense`` pattern (it has no table) and on a builder's bad options.
    """
    if name == "dense":
        raise ValueError("the dense pattern has no index table")
    return _index_table_cached(name, _freeze(options), int(num_tokens), int(num_heads), int(depth), bool(cls_token))


# ------------------------------------------------------------------ the C++ extension

_EXT: Any = None
_EXT_ERROR: BaseException | None = None
_EXT_LOCK = threading.Lock()
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel ships the binary

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def load_extension(verbose: bool = False) -> Any:
    """Compile (first call on a machine, ~30-60 s on 2 cores) or load the C++ kernel; returns the
    module, or ``None`` after logging a warning when the build fails (no compiler, no ninja...).
    The failure is remembered for the process; :data:`_EXT_ERROR` holds it."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    with _EXT_LOCK:
        if _EXT is not None or _EXT_ERROR is not None:
            return _EXT
        if os.environ.get("FIBO_DISABLE_SPARSE_EXT"):
            _EXT_ERROR = RuntimeError("disabled by FIBO_DISABLE_SPARSE_EXT")
            log.warning("fibo sparse attention kernel disabled (FIBO_DISABLE_SPARSE_EXT): using sdpa")
            return None
        # the torch install path too: each venv builds against its own headers, so two checkouts
        # must not share (and keep rebuilding) one build folder
        key = "|".join([CPP_SOURCE, torch.__version__, os.path.dirname(torch.__file__), " ".join(_CFLAGS),
                        _cpu_signature(), sys.version])
        name = "fibo_sparse_attn_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load_inline

            _ensure_ninja_on_path()
            _EXT = load_inline(name=name, cpp_sources=[CPP_SOURCE], extra_cflags=_CFLAGS,
                               extra_ldflags=["-fopenmp"], verbose=verbose)
            log.info("fibo sparse attention kernel %s ready in %.1f s", name, time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - any build failure means "fall back"
            _EXT_ERROR = err
            log.warning("fibo sparse attention kernel could not be built (%s: %s); falling back to sdpa",
                        type(err).__name__, str(err).strip().splitlines()[-1] if str(err).strip() else "")
    return _EXT


def extension_available() -> bool:
    """True when the C++ kernel is built and loaded (builds it on first call)."""
    return load_extension() is not None


def _d_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table: IndexTable, scale: float):
        ext = load_extension()
        if ext is None:
            raise RuntimeError(f"fibo sparse attention kernel unavailable: {_EXT_ERROR}")
        q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
        out, lse = ext.forward(q, k, v, table.row_ptr, table.cols, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.table, ctx.scale = table, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        t = ctx.table
        dq, dk, dv = load_extension().backward(_d_contiguous(grad_out), q, k, v, out, lse, t.row_ptr, t.cols,
                                               t.t_row_ptr, t.t_cols, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: IndexTable,
                     scale: float | None = None) -> torch.Tensor:
    """``-inf``-masked softmax attention computed on the allowed entries only (CPU, fp32/fp64).

    Args:
        q, k, v: ``(B, H, L, d)`` CPU tensors of one floating dtype (any strides; the head dim is made
            contiguous if it is not).
        table: the pattern (``table.num_heads == H``, ``table.seq_len == L``).
        scale: score scale; ``None`` = ``d ** -0.5`` (as SDPA).

    Returns:
        ``(B, H, L, d)`` (stored as ``(B, L, H, d)``, so ``out.transpose(1, 2).reshape(B, L, H * d)``
        is free). Differentiable in q, k, v (first order).

    Raises:
        RuntimeError: the C++ kernel could not be built, or shapes, dtypes or devices do not fit.

    Cost: O(B * nnz * d) time for the forward, about 3.5x that for the backward, O(B H L d) memory.
    """
    if q.shape[1] != table.num_heads or q.shape[2] != table.seq_len:
        raise RuntimeError(f"index table is for H={table.num_heads}, L={table.seq_len}; got q of shape {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SparseAttention.apply(q, k, v, table, scale)
