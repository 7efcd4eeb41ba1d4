"""Where the backend is chosen: the backend objects and :func:`choose_backend`.

Same math on every backend, only the cost differs. ``attention.backend`` names one of
:data:`BACKENDS` or ``auto``. ``auto`` is a loop over :data:`AUTO_ORDER`: the first backend of the
call's ``mask_semantics`` that is preferred for the call (cheap, asked first) and supports it wins:

1. ``triton``: the Triton offset kernel, CUDA, offset patterns (Fibottention, Longformer, dilated,
   strided), fp32/fp16/bf16, no attention dropout;
2. ``flex``: FlexAttention block mask, CUDA, other sparse patterns from ``AUTO_GPU_MIN_TOKENS``
   (1024) patch tokens on;
3. ``sparse``: the fused C++ kernel, CPU, fp32/fp64, no attention dropout, when it builds;
4. ``sdpa``: dense boolean mask + SDPA (runs everything; on CUDA the small-N mask patterns);
5. ``zero_score``: the only backend of ``mask_semantics=zero_score`` (the authors' semantics).

So on CUDA: a dense pattern -> SDPA without a mask (the flash kernel), an offset pattern -> triton,
another sparse pattern -> flex for large N, masked SDPA for small N. On the CPU: sparse, else sdpa.
**The CUDA rule is provisional**: it was written without a GPU (the Triton kernel was tested in
Triton's CPU interpreter only). ``python scripts/gpu_check.py`` measures every backend per N and
dtype on a GPU and prints the rule its measurements support; replace :data:`AUTO_ORDER` /
``AUTO_*_MIN_TOKENS`` by that rule once it has run.

``reference`` (explicit math, :func:`~fibo.attention.backends.sdpa.math_neg_inf`) is never taken by
``auto``. A dense pattern has nothing to skip: it always runs through ``sdpa``, whatever is asked.
An explicit backend that cannot run the call raises one ``ValueError`` line naming it and the fix.
"""

from __future__ import annotations

import torch

from fibo.attention.backends.base import AttentionCall, Backend
from fibo.attention.backends.cpu_sparse import CpuSparse
from fibo.attention.backends.flex import Flex
from fibo.attention.backends.sdpa import Reference, Sdpa, ZeroScore, math_neg_inf, zero_score
from fibo.attention.backends.triton_offsets import TritonOffsets

__all__ = ["AttentionCall", "Backend", "BACKENDS", "AUTO_ORDER", "BACKEND_CHOICES", "choose_backend",
           "resolve_backend", "math_neg_inf", "zero_score"]

SDPA, SPARSE, FLEX, REFERENCE, ZERO_SCORE, TRITON = Sdpa(), CpuSparse(), Flex(), Reference(), ZeroScore(), TritonOffsets()

#: name -> backend object (``zero_score`` is chosen by ``mask_semantics``, not by name).
BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPA, SPARSE, FLEX, TRITON, REFERENCE, ZERO_SCORE)}
#: the order ``auto`` tries backends in (on CUDA provisional until scripts/gpu_check.py has run).
AUTO_ORDER: tuple[Backend, ...] = (TRITON, FLEX, SPARSE, SDPA, ZERO_SCORE)
#: the values of ``attention.backend``.
BACKEND_CHOICES = ("auto", "sdpa", "sparse", "flex", "triton", "reference")


def choose_backend(requested: str, call: AttentionCall, semantics: str = "neg_inf") -> Backend:
    """The backend that computes ``call`` (rule in the module docstring).

    Args:
        requested: one of :data:`BACKEND_CHOICES`. call: what must run. semantics: ``neg_inf`` or ``zero_score``.

    Raises:
        ValueError: ``requested`` is unknown, or it cannot run ``call`` (the message names the fix).
    """
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"attention.backend={requested!r} is not one of {list(BACKEND_CHOICES)}")
    if call.dense:
        return SDPA  # no mask: every semantics is plain softmax attention
    if requested == "auto":
        for backend in AUTO_ORDER:
            if backend.semantics == semantics and backend.preferred(call) and backend.supports(call) is None:
                return backend
        raise ValueError(f"no attention backend runs mask_semantics={semantics} for {call}")  # unreachable: sdpa/zero_score run all
    backend = BACKENDS[requested]
    reason = (f"it computes mask_semantics={backend.semantics}, not {semantics}; use attention.backend=auto"
              if backend.semantics != semantics else backend.supports(call))
    if reason:
        raise ValueError(f"attention.backend={requested} cannot run this call: {reason}")
    return backend


def resolve_backend(requested: str, *, device: torch.device, num_tokens: int, dtype: torch.dtype,
                    dropout_p: float = 0.0, dense: bool = False, requires_grad: bool = False) -> str:
    """The name of :func:`choose_backend`'s choice for a ``neg_inf`` call with these inputs."""
    call = AttentionCall(torch.device(device), dtype, num_tokens, dropout_p, dense, requires_grad)
    return choose_backend(requested, call).name
