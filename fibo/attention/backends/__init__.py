"""Where the backend is chosen: the backend objects and :func:`choose_backend`.

Same math on every backend, only the cost differs. ``attention.backend`` names one of
:data:`BACKENDS` or ``auto``. A dense pattern has nothing to skip: it always runs through ``sdpa``
without a mask (on CUDA the flash kernel), whatever is asked. For a sparse pattern, ``auto`` takes
the first backend of its candidate list that computes the call's ``mask_semantics`` and supports
the call (:meth:`~fibo.attention.backends.base.Backend.supports`):

* **on CUDA** the candidates come from the table :data:`CUDA_AUTO_RULE` (data, not code): for the
  call's pattern kind (``offset``: Fibottention, Longformer, dilated, sparse_transformer; ``mask``:
  BigBird, random), dtype and head dim, the backends fastest first from a number of patch tokens
  on, then ``sdpa`` and ``zero_score`` (which run everything). ``python scripts/gpu_check.py`` measures
  every backend per N, dtype and head dim on a GPU and prints a measured table in this very form
  (paste it over :data:`CUDA_AUTO_RULE` and set :data:`CUDA_AUTO_RULE_SOURCE`).
  **Provisional**: the table below was written without a GPU (the Triton kernel was tested in
  Triton's CPU interpreter only), see :data:`CUDA_AUTO_RULE_SOURCE`.
* **elsewhere** (the CPU) the candidates are :data:`AUTO_ORDER` where the backend is ``preferred``:
  ``sparse`` (the fused C++ kernel: fp32/fp64, no attention dropout, when it builds), else ``sdpa``
  (dense boolean mask); ``zero_score`` for ``mask_semantics=zero_score`` (the authors' semantics).

``reference`` (explicit math, :func:`~fibo.attention.backends.sdpa.math_neg_inf`) is never taken by
``auto``. An explicit backend that cannot run the call raises one ``ValueError`` line naming it and
the fix.
"""

from __future__ import annotations

from fibo.attention.backends.base import AttentionCall, Backend
from fibo.attention.backends.cpu_sparse import CpuSparse
from fibo.attention.backends.flex import Flex
from fibo.attention.backends.sdpa import Reference, Sdpa, ZeroScore, math_neg_inf, zero_score
from fibo.attention.backends.triton_offsets import TritonOffsets

__all__ = ["AttentionCall", "Backend", "BACKENDS", "AUTO_ORDER", "BACKEND_CHOICES", "CUDA_AUTO_RULE",
           "CUDA_AUTO_RULE_SOURCE", "auto_candidates", "cuda_ranking", "choose_backend",
           "math_neg_inf", "zero_score"]

SDPA, SPARSE, FLEX, REFERENCE, ZERO_SCORE, TRITON = Sdpa(), CpuSparse(), Flex(), Reference(), ZeroScore(), TritonOffsets()

#: name -> backend object (``zero_score`` is chosen by ``mask_semantics``, not by name).
BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPA, SPARSE, FLEX, TRITON, REFERENCE, ZERO_SCORE)}
#: the order ``auto`` tries backends in off CUDA (each where :meth:`Backend.preferred`).
AUTO_ORDER: tuple[Backend, ...] = (TRITON, FLEX, SPARSE, SDPA, ZERO_SCORE)
#: the values of ``attention.backend``.
BACKEND_CHOICES = ("auto", "sdpa", "sparse", "flex", "triton", "reference")

#: ``auto`` on CUDA, as data. Key: ``(kind, dtype, head_dim)`` with ``kind`` ``"offset"`` or ``"mask"``,
#: ``dtype`` a torch dtype name (``"bfloat16"``) or ``"*"``, ``head_dim`` an int or ``"*"``; the most
#: specific key that matches wins (dtype and head dim, dtype, head dim, neither). Value: steps
#: ``(from_tokens, backends fastest first)`` in increasing ``from_tokens`` (patch tokens N); a call
#: takes the last step with ``from_tokens <= N``. ``scripts/gpu_check.py`` prints a measured table of
#: this form (ranked by forward+backward time). PROVISIONAL until then: the offset kernel everywhere
#: (it reads only the allowed entries; where it cannot run, masked SDPA below 1024 tokens and
#: FlexAttention from 1024 on), FlexAttention for mask patterns from 1024 tokens (below,
#: 128-token blocks are rarely empty), masked SDPA below.
CUDA_AUTO_RULE: dict[tuple[str, str, int | str], tuple[tuple[int, tuple[str, ...]], ...]] = {
    ("offset", "*", "*"): ((1, ("triton", "sdpa", "flex")), (1024, ("triton", "flex", "sdpa"))),
    ("mask", "*", "*"): ((1, ("sdpa", "flex")), (1024, ("flex", "sdpa"))),
}
#: Where :data:`CUDA_AUTO_RULE` comes from (gpu_check.py prints the line for a measured table).
CUDA_AUTO_RULE_SOURCE = "provisional: written without a GPU, not measured (run scripts/gpu_check.py on one)"


def cuda_ranking(call: AttentionCall, rule: dict | None = None) -> tuple[str, ...]:
    """Backend names, fastest first, that :data:`CUDA_AUTO_RULE` (or ``rule``) gives ``call``
    (``()`` when no key matches). ``call.head_dim == 0`` (unknown) matches only ``"*"`` head dims."""
    rule = CUDA_AUTO_RULE if rule is None else rule
    kind = "offset" if call.offset_pattern else "mask"
    dtype = str(call.dtype).removeprefix("torch.")
    hd = call.head_dim or None
    for key in ((kind, dtype, hd), (kind, dtype, "*"), (kind, "*", hd), (kind, "*", "*")):
        if key in rule:
            ranking: tuple[str, ...] = ()
            for from_tokens, names in rule[key]:
                if call.num_tokens >= from_tokens:
                    ranking = tuple(names)
            return ranking
    return ()


def auto_candidates(call: AttentionCall) -> list[Backend]:
    """The backends ``auto`` tries for ``call``, in order (see the module docstring)."""
    if call.device.type == "cuda":
        names = [n for n in cuda_ranking(call) if n in BACKENDS and n != "reference"]
        return [BACKENDS[n] for n in names] + [b for b in (SDPA, ZERO_SCORE) if b.name not in names]
    return [b for b in AUTO_ORDER if b.preferred(call)]


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
        for backend in auto_candidates(call):
            if backend.semantics == semantics and backend.supports(call) is None:
                return backend
        raise ValueError(f"no attention backend runs mask_semantics={semantics} for {call}")  # unreachable: sdpa/zero_score run all
    backend = BACKENDS[requested]
    reason = (f"it computes mask_semantics={backend.semantics}, not {semantics}; use attention.backend=auto"
              if backend.semantics != semantics else backend.supports(call))
    if reason:
        raise ValueError(f"attention.backend={requested} cannot run this call: {reason}")
    return backend

