"""The Fibottention pattern: its offsets, windows and per-layer head permutation, and the
:class:`Fibottention` pattern object.

Deterministic and free of global state: nothing here touches Python's, NumPy's or torch's global
RNG. ``num_tokens`` (N) always counts patch tokens only (CLS excluded).

Fibottention (arXiv 2406.19391, Sec. 3 and the authors' reference code):

* head ``i`` (1-based, of H) takes row ``i`` of the Wythoff array as its seed pair
  ``a_i = floor(floor(i*phi)*phi)``, ``b_i = floor(floor(i*phi)*phi^2)``, ``phi = (1+sqrt 5)/2``;
  the *modified* variant starts from ``(2a_i - b_i, b_i - a_i)`` instead, which adds small local
  offsets (head 1 becomes 0, 1, 1, 2, 3, 5);
* its window is ``w_i = w_min + int((w_max - w_min) / (H - 1) * (i - 1))`` (float arithmetic exactly
  as the reference, so e.g. H=12, N=196 gives 64 for the last head, not 65);
* its offsets O_i are the Fibonacci-type sequence ``a_i, b_i, a_i + b_i, ...`` keeping the terms
  ``<= w_i``; the reference keeps ``[a_i]`` even when ``a_i > w_i``;
* patch token t attends patch tokens ``t + o`` and ``t - o`` for every ``o`` in O_i inside
  ``[0, N)``; the CLS row and column are dense;
* per layer ``depth`` the offset sets are permuted over heads with
  ``random.Random(depth).shuffle(list(range(H)))`` (a local RNG).

Decisions where the reference is silent or undefined (documented and tested):

* ``H = 1``: the window formula divides by ``H - 1``; the single head gets ``w_max`` (the whole
  Fibonacci ladder up to ``N // 3``, i.e. O(log N) offsets covering the full range).
* ``w_max < w_min`` (small N, e.g. N < 15 with the defaults): ``w_max`` is raised to ``w_min`` so
  every head gets window ``w_min``.
* offsets ``>= N`` stay in the offset list (it is the reference's sequence) but connect nothing:
  ``t +- o`` falls outside ``[0, N)``.
* offset 0 (modified variant, head 1) is the token itself; duplicate offsets (1, 1) are one entry.

Ablation (arXiv 2406.19391's argument for per-head diversity, option ``shared_offsets``): every head
of a layer uses the offset set (and window) that head 0 of that layer has, so all heads of a layer
are equal; with ``permute_heads_per_layer`` that set changes from layer to layer
(``head_permutation(H, depth)[0]``), without it every layer uses head 1's set (Wythoff row 1, window
``w_min``). Off by default (the golden values are the per-head pattern).

Head 0's set is the sparsest or the densest of the layer depending on the permutation, so the
ablation also changes the density. ``shared_set="matched"`` removes that confound: every head of every
layer uses the one Wythoff row whose patch-block pair count (:func:`toeplitz_pairs`) is closest to the
mean over the ``H`` per-head sets (ties: the lower row), so density stays near Fibottention's and only
the diversity differs (the permutation is then irrelevant: one set everywhere).
"""

from __future__ import annotations

import math
import random

from fibo.attention.patterns.base import OffsetPattern, check_sizes, toeplitz_pairs

PHI = (1.0 + math.sqrt(5.0)) / 2.0

__all__ = ["wythoff_pair", "fibottention_windows", "fibottention_offsets", "head_permutation", "Fibottention"]


def wythoff_pair(row: int) -> tuple[int, int]:
    """First two entries of row ``row`` (1-based) of the Wythoff array: (1, 2), (4, 7), (6, 10), ...

    Raises:
        ValueError: if ``row < 1``.
    """
    if row < 1:
        raise ValueError(f"Wythoff rows are 1-based; got row={row}")
    k = math.floor(row * PHI)
    return math.floor(k * PHI), math.floor(k * PHI * PHI)


def _resolve_w_max(num_tokens: int, w_min: int, w_max: int | None) -> int:
    w_max = num_tokens // 3 if w_max is None else int(w_max)
    return max(w_max, w_min)


def fibottention_windows(num_tokens: int, num_heads: int, w_min: int = 5, w_max: int | None = None) -> list[int]:
    """Per-head window sizes ``w_i`` (in tokens), head 1 first. ``w_max=None`` means ``num_tokens // 3``.

    ``H = 1`` gets ``[w_max]``; ``w_max < w_min`` is raised to ``w_min`` (see module docstring).

    Raises:
        ValueError: if ``num_tokens < 1``, ``num_heads < 1`` or ``w_min < 1``.
    """
    check_sizes(num_tokens, num_heads)
    if w_min < 1:
        raise ValueError(f"w_min must be >= 1, got {w_min}")
    w_max = _resolve_w_max(num_tokens, w_min, w_max)
    if num_heads == 1:
        return [w_max]
    step = (w_max - w_min) / (num_heads - 1)
    return [w_min + int(step * (i - 1)) for i in range(1, num_heads + 1)]


def _fibonacci_up_to(a: int, b: int, window: int) -> list[int]:
    if a > window:
        return [a]
    seq = [a]
    x, y = a, b
    while y <= window:
        seq.append(y)
        x, y = y, x + y
    return seq


def fibottention_offsets(
    num_tokens: int,
    num_heads: int,
    w_min: int = 5,
    w_max: int | None = None,
    modified: bool = False,
) -> list[list[int]]:
    """Offsets O_i per head (head 1 first), before any per-layer permutation.

    Args:
        num_tokens: N, the number of patch tokens (CLS excluded).
        num_heads: H.
        w_min, w_max: smallest and largest window; ``w_max=None`` means ``N // 3``.
        modified: use the modified seed pair ``(2a - b, b - a)`` (adds offsets 0 and 1 to head 1).

    Returns:
        ``H`` lists of non-negative ints in sequence order; the modified variant may repeat a value
        (``[0, 1, 1, 2, 3, 5]``) exactly as the reference sequence does.

    Raises:
        ValueError: on non-positive sizes.
    """
    windows = fibottention_windows(num_tokens, num_heads, w_min, w_max)
    offsets = []
    for i, window in enumerate(windows, start=1):
        a, b = wythoff_pair(i)
        if modified:
            a, b = 2 * a - b, b - a
        offsets.append(_fibonacci_up_to(a, b, window))
    return offsets


def head_permutation(num_heads: int, depth: int) -> list[int]:
    """Entry ``j`` = index (0-based Wythoff row) of the offset set used by head ``j`` of layer ``depth``.

    Follows the reference: ``random.Random(depth).shuffle(list(range(H)))`` on a local RNG, so the
    global ``random`` state is untouched.
    """
    perm = list(range(num_heads))
    random.Random(depth).shuffle(perm)
    return perm


class Fibottention(OffsetPattern):
    """Fibottention (arXiv 2406.19391): head ``j`` of layer ``depth`` attends at the offsets of Wythoff
    row ``head_permutation(H, depth)[j] + 1`` (``permute_heads_per_layer``, default) or row ``j + 1``.

    Options: ``modified`` (seed pair ``(2a - b, b - a)``), ``w_min``, ``w_max`` (``None`` = N // 3),
    ``permute_heads_per_layer``, ``shared_offsets`` (the ablation: every head of a layer uses one
    set), ``shared_set`` (which set: ``"first"`` = head 0's, ``"matched"`` = the density-matched row;
    see the module docstring). Sizes are checked by :func:`fibottention_windows`.

    Raises:
        ValueError: ``shared_set`` other than ``"first"`` or ``"matched"``.
    """

    name = "fibottention"
    defaults = {"modified": False, "w_min": 5, "w_max": None, "permute_heads_per_layer": True,
                "shared_offsets": False, "shared_set": "first"}

    def check(self) -> None:
        if self.options["shared_set"] not in ("first", "matched"):
            raise ValueError(f"attention.shared_set={self.options['shared_set']!r} must be first or matched "
                             "(attention=fibottention)")

    def head_offsets(self, num_tokens: int, num_heads: int, depth: int = 0) -> list[list[int]]:
        o = self.options
        w_max = None if o["w_max"] is None else int(o["w_max"])
        offsets = fibottention_offsets(num_tokens, num_heads, w_min=int(o["w_min"]), w_max=w_max, modified=o["modified"])
        order = head_permutation(num_heads, depth) if o["permute_heads_per_layer"] else list(range(num_heads))
        if o["shared_offsets"] and o["shared_set"] == "matched":
            pairs = [toeplitz_pairs(offs, num_tokens) for offs in offsets]
            mean = sum(pairs) / len(pairs)
            order = [min(range(num_heads), key=lambda r: (abs(pairs[r] - mean), r))] * num_heads
        elif o["shared_offsets"]:
            order = [order[0]] * num_heads
        return [offsets[j] for j in order]
