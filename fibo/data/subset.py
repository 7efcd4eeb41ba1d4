"""Training-set size as a knob (``data.train_samples``, ``data.num_demos``): seeded, nested subsets.

Nested means: for one seed, the subset of ``n`` samples is contained in the subset of any ``n' > n``
samples, so a data-efficiency curve adds data instead of drawing a new set at every size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resolve_train_samples(value: int | float | None, available: int, num_classes: int = 1,
                          key: str = "data.train_samples", unit: str = "samples",
                          fractions: bool = True) -> int | None:
    """The number of training samples ``value`` asks for: ``None`` (all), an integer, or (if ``fractions``)
    a fraction in (0, 1] of ``available``, rounded; at least ``num_classes`` (one sample per class).

    Raises:
        ValueError: one line naming ``key``, the valid range (with ``available`` and ``num_classes``)
            and the fix, for a non-number, 0, a negative value, a fraction outside (0, 1], fewer samples
            than classes or more than ``available``.
    """
    if value is None:
        return None
    low = f"{num_classes} (one per class, {num_classes} classes)" if num_classes > 1 else str(num_classes)
    valid = (f"give an integer from {low} to {available} (all {available} training {unit})"
             + (", a fraction in (0, 1]" if fractions else "") + f", or {key}=null for all")
    is_float = isinstance(value, (float, np.floating))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (is_float and fractions):
        raise ValueError(f"{key}={value!r} is not {'a number' if fractions else 'an integer'}: {valid}")
    if is_float and not 0 < value <= 1:
        raise ValueError(f"{key}={value} is a fraction outside (0, 1]: {valid}")
    n = int(round(float(value) * available)) if is_float else int(value)
    if not max(num_classes, 1) <= n <= available:
        asked = f" ({n} {unit})" if is_float else ""
        raise ValueError(f"{key}={value}{asked} is out of range: {valid}")
    return n


def stratified_subset(labels: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` of ``labels``'s samples, stratified per class and nested in ``n``.

    Each class's samples are shuffled once by ``seed`` (independent of ``n``) and a prefix of each is
    taken. The prefix sizes come from Balinski and Young's quota method ("A new method for
    congressional apportionment", PNAS 1975), a house-monotone apportionment (a larger ``n`` never
    takes a sample away from a class, hence the nesting) that keeps every class within one sample of
    its proportional share ``n * n_c / N`` -- after every class first gets one sample (so with very
    unequal classes and small ``n`` a large class can be more than one below its share).

    Args:
        labels: class of each sample, length ``N``.
        n: subset size, ``num_classes <= n <= N`` (see :func:`resolve_train_samples`).
        seed: the shuffle seed (``data.split_seed``).

    Returns:
        int64 ``(n,)`` indices into ``labels``, ascending.

    Raises:
        ValueError: ``n`` outside ``[num_classes, N]``.
    """
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    total, m = len(labels), len(classes)
    if not m <= n <= total:
        raise ValueError(f"a stratified subset of {n} samples needs {m} to {total} ({m} classes, {total} samples)")
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.ones(m, dtype=np.int64)  # every class first gets one sample
    for k in range(m + 1, n + 1):
        # upper quota: a class may get the k-th sample only while below its share k * n_c / N;
        # among those, the largest n_c / (count_c + 1) (D'Hondt's priority), lowest class on ties
        eligible = counts * total < sizes * k
        priority = np.where(eligible, sizes / (counts + 1), -1.0)
        counts[int(np.argmax(priority))] += 1
    return np.sort(np.concatenate([idx[:c] for idx, c in zip(members, counts)])).astype(np.int64)


def seeded_prefix(names: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``names`` (order kept), drawn as a prefix of one ``seed``-ed permutation: nested in ``n``."""
    order = np.random.default_rng(seed).permutation(len(names))[:n]
    return [names[i] for i in sorted(order)]
