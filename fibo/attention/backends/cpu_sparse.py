"""The fused CPU sparse-attention backend: ``-inf`` attention on the allowed entries only.

Cost: time and memory grow with ``sum_i N * |O_i|`` (the keys each query may attend), forward and
backward; the ``L x L`` score matrix and the gathered keys are never materialised. The pattern comes
as an :class:`~fibo.attention.patterns.table.IndexTable` (``layout.table()``: built from the offsets in
O(N |O|) for offset patterns). The C++ kernel in :mod:`fibo.attention.backends._sparse_cpu_src` is
compiled at first use with :func:`torch.utils.cpp_extension.load_inline` (cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; needs a C++ compiler and ``ninja``) and
wrapped in an autograd function whose backward recomputes the probabilities from the saved
log-sum-exp in one pass over the table (no transposed table, no atomics; see the kernel's module
docstring). The compiled extension (:data:`KERNEL`) is this package's only module-level state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fibo.attention.backends._sparse_cpu_src import CPP_SOURCE
from fibo.attention.backends.base import AttentionCall, Backend
from fibo.attention.patterns.table import IndexTable

log = logging.getLogger(__name__)

__all__ = ["CpuSparse", "sparse_attention", "load_extension", "extension_available", "KERNEL"]

#: ``auto`` on the CPU uses the fused sparse kernel from this many patch tokens on: measured on a
#: 2-core x86 CPU (H=12, d=64, fp32) it is faster than dense SDPA forward+backward from N=16 on; see
#: experiments/sparse_attention_benchmark.md.
AUTO_CPU_MIN_TOKENS = 1


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


class _Kernel:
    """The compiled extension handle (the module's only state): ``module`` once built, or ``error``
    once a build failed (remembered for the process, so the build is tried once)."""

    def __init__(self) -> None:
        self.module: Any = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()


KERNEL = _Kernel()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def load_extension(verbose: bool = False) -> Any:
    """Compile (first call on a machine, ~30-60 s on 2 cores) or load the C++ kernel; returns the
    module, or ``None`` after logging a warning when the build fails (no compiler, no ninja...).
    The failure is remembered for the process in ``KERNEL.error``."""
    k = KERNEL
    if k.module is not None or k.error is not None:
        return k.module
    with k.lock:
        if k.module is not None or k.error is not None:
            return k.module
        if os.environ.get("FIBO_DISABLE_SPARSE_EXT"):
            k.error = RuntimeError("disabled by FIBO_DISABLE_SPARSE_EXT")
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
            k.module = load_inline(name=name, cpp_sources=[CPP_SOURCE], extra_cflags=_CFLAGS,
                                   extra_ldflags=["-fopenmp"], verbose=verbose)
            log.info("fibo sparse attention kernel %s ready in %.1f s", name, time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - any build failure means "fall back"
            k.error = err
            log.warning("fibo sparse attention kernel could not be built (%s); falling back to sdpa", _one_line(err))
    return k.module


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
            raise RuntimeError(f"fibo sparse attention kernel unavailable: {KERNEL.error}")
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
        dq, dk, dv = load_extension().backward(_d_contiguous(grad_out), q, k, v, out, lse, t.row_ptr, t.cols, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: IndexTable,
                     scale: float | None = None) -> torch.Tensor:
    """``-inf``-masked softmax attention computed on the allowed entries only (CPU, fp32/fp64).

    Args:
        q, k, v: ``(B, H, L, d)`` CPU tensors of one floating dtype (any strides; the head dim is made
            contiguous if it is not).
        table: the pattern (``table.num_heads == H``, ``table.seq_len == L``), e.g. ``layout.table()``.
        scale: score scale; ``None`` = ``d ** -0.5`` (as SDPA).

    Returns:
        ``(B, H, L, d)`` (stored as ``(B, L, H, d)``, so ``out.transpose(1, 2).reshape(B, L, H * d)``
        is free). Differentiable in q, k, v (first order).

    Raises:
        RuntimeError: the C++ kernel could not be built, or shapes, dtypes or devices do not fit.

    Cost: O(B * nnz * d) time for the forward (1 dot product + 1 axpy of length d per allowed
    entry), about 2.5x that for the backward (2 dot products + 3 axpys), O(B H L d) memory; each
    pass reads its inputs and writes its outputs once.
    """
    if q.shape[1] != table.num_heads or q.shape[2] != table.seq_len:
        raise RuntimeError(f"index table is for H={table.num_heads}, L={table.seq_len}; got q of shape {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SparseAttention.apply(q, k, v, table, scale)


class CpuSparse(Backend):
    """The fused C++ kernel (``attention.backend=sparse``): CPU, fp32/fp64, no attention dropout."""

    name = "sparse"

    def supports(self, call: AttentionCall) -> str | None:
        fix = "use attention.backend=auto (or sdpa)"
        if call.dense:
            return "the dense pattern has no entries to skip; " + fix
        if call.device.type != "cpu":
            return f"the fused kernel runs on the CPU only, got {call.device}; use attention.backend=flex or auto"
        if call.dtype not in (torch.float32, torch.float64):
            return f"the fused kernel computes in float32/float64, got {call.dtype}; " + fix
        if call.dropout_p > 0.0:
            return f"the fused kernel has no attention dropout (attn_drop={call.dropout_p}); set attn_drop=0 or " + fix
        if not extension_available():
            return f"the C++ kernel could not be built ({_one_line(KERNEL.error)}); " + fix
        return None

    def preferred(self, call: AttentionCall) -> bool:
        return call.num_tokens >= AUTO_CPU_MIN_TOKENS

    def prepare(self, layer, num_tokens, device):
        return layer.cached(("table", num_tokens), lambda: layer.layout(num_tokens).table())

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return sparse_attention(q, k, v, prepared)
