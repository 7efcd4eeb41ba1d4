"""Triton kernels of the offset (Toeplitz) attention backend (:mod:`fibo.attention.backends.triton_offsets`).

Import this module only through :func:`fibo.attention.backends.triton_offsets.load_kernels`: Triton
decides at decoration time (``@triton.jit``, i.e. at this module's import) whether the kernels are
compiled for the GPU or run by its CPU interpreter (``TRITON_INTERPRET=1``); :data:`INTERPRETED`
records which.

Index conventions (every kernel): tensors ``(B, H, L, D)`` with ``L = N + HAS_CLS`` and the head dim
contiguous; patch token ``t`` (0-based, ``[0, N)``) is sequence row ``t + HAS_CLS``; the CLS token is
row 0. ``OFF`` is ``(H, MAX_OFF)`` int32, the signed offsets ``s`` of head ``h`` in its first
``NOFF[h]`` entries: patch query ``t`` attends patch key ``t + s`` when it lies in ``[0, N)``; for
``s == 0`` only where ``DIAG[h, t]`` (int8, ``(H, N)``) is set (the empty-row rule, or offset 0 of the
pattern: then every entry is set). ``LSE`` and ``DELTA`` are ``(B * H, L)`` fp32, the log-sum-exp
in base 2 of the scaled scores (``qk_scale = scale * log2(e)``) and ``rowsum(dO * O)``.

Every (query, key) product is a row-wise dot product of two contiguous ``(BLOCK_M, D)`` tiles (the
query block and the same block shifted by ``s``): a Toeplitz pattern puts one key per query on each
offset, so there is no dense tile to multiply and nothing of size ``N x N`` or any gathered copy.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: True when these kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRETED = bool(knobs.runtime.interpret)

NEG_INF = float("-inf")


# Sums and maxima as tl.reduce with triton.language's own combine functions, zeros as tl.full:
# tl.sum / tl.max / tl.zeros are @triton.jit functions of triton.language, compiled or interpreted
# as Triton itself was imported, so calling them fails in the interpreter when Triton was imported
# before TRITON_INTERPRET=1 was set. The interpreter reduces with NumPy for exactly these combine
# functions (and compiled, this is what tl.sum / tl.max expand to).
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max


@triton.jit
def _patch_fwd(Q, K, V, O, LSE, OFF, NOFF, DIAG,
               sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
               H, N, L, MAX_OFF, qk_scale,
               HAS_CLS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Output rows of one block of BLOCK_M patch queries of one (batch, head)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    b = bh // H
    h = bh % H
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = t < N
    dmask = dd < D
    qbase = Q + b * sqb + h * sqh
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    q = tl.load(qbase + (t + HAS_CLS)[:, None] * sql + dd[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    diag = tl.load(DIAG + h * N + t, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if HAS_CLS:  # key 0 (CLS) for every patch query: offsets stay inside the patch block, so never counted twice
        k0 = tl.load(kbase + dd, mask=dmask, other=0.0).to(tl.float32)
        v0 = tl.load(vbase + dd, mask=dmask, other=0.0).to(tl.float32)
        m_i = tl.reduce(q * k0[None, :], 1, _add) * qk_scale
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = acc + v0[None, :]
    n_off = tl.load(NOFF + h)
    for i in range(0, n_off):
        s_off = tl.load(OFF + h * MAX_OFF + i)
        j = t + s_off
        ok = row_ok & (j >= 0) & (j < N) & ((s_off != 0) | (diag != 0))
        tile = ok[:, None] & dmask[None, :]
        k = tl.load(kbase + (j + HAS_CLS)[:, None] * skl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        v = tl.load(vbase + (j + HAS_CLS)[:, None] * svl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.reduce(q * k, 1, _add) * qk_scale, NEG_INF)
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    rows = t + HAS_CLS
    tl.store(O + b * sob + h * soh + rows[:, None] * sol + dd[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dmask[None, :])
    tl.store(LSE + bh * L + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _cls_fwd_partial(Q, K, V, PM, PL, PACC,
                     sqb, sqh, skb, skh, skl, svb, svh, svl,
                     H, L, CHUNK, NSPLIT, qk_scale,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The dense CLS row over keys ``[split * CHUNK, (split + 1) * CHUNK)``: partial max, sum and
    weighted values (combined in :func:`~fibo.attention.backends.triton_offsets` by log-sum-exp)."""
    bh = tl.program_id(0).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    q0 = tl.load(Q + b * sqb + h * sqh + dd, mask=dmask, other=0.0).to(tl.float32)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    m_i = tl.reduce(tl.full([BLOCK_N], NEG_INF, tl.float32), 0, _max)
    l_i = tl.reduce(tl.full([BLOCK_N], 0.0, tl.float32), 0, _add)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    start = split * CHUNK
    for j0 in range(start, start + CHUNK, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < L
        tile = ok[:, None] & dmask[None, :]
        k = tl.load(kbase + j[:, None] * skl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        v = tl.load(vbase + j[:, None] * svl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.reduce(k * q0[None, :], 1, _add) * qk_scale, NEG_INF)
        m_new = tl.maximum(m_i, tl.reduce(s, 0, _max))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 0, _add)
        acc = acc * alpha + tl.reduce(p[:, None] * v, 0, _add)
        m_i = m_new
    tl.store(PM + bh * NSPLIT + split, m_i)
    tl.store(PL + bh * NSPLIT + split, l_i)
    tl.store(PACC + (bh * NSPLIT + split) * BLOCK_D + dd, acc)


@triton.jit
def _bwd_delta(O, DO, DELTA, sob, soh, sol, sdb, sdh, sdl, H, L,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DELTA[bh, i] = sum_d dO[i, d] * O[i, d]`` for one block of rows (all L rows)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    b = bh // H
    h = bh % H
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    tile = (r < L)[:, None] & (dd < D)[None, :]
    o = tl.load(O + b * sob + h * soh + r[:, None] * sol + dd[None, :], mask=tile, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + r[:, None] * sdl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + r, tl.reduce(o * do, 1, _add), mask=r < L)


@triton.jit
def _patch_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, OFF, NOFF, DIAG,
                  sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,
                  H, N, L, MAX_OFF, qk_scale, sm_scale,
                  HAS_CLS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one block of patch queries: its keys at every offset, and the CLS key."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    b = bh // H
    h = bh % H
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = t < N
    dmask = dd < D
    rows = t + HAS_CLS
    qtile = row_ok[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + dd[None, :], mask=qtile, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdl + dd[None, :], mask=qtile, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
    diag = tl.load(DIAG + h * N + t, mask=row_ok, other=0)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if HAS_CLS:
        k0 = tl.load(kbase + dd, mask=dmask, other=0.0).to(tl.float32)
        v0 = tl.load(vbase + dd, mask=dmask, other=0.0).to(tl.float32)
        p = tl.where(row_ok, tl.exp2(tl.reduce(q * k0[None, :], 1, _add) * qk_scale - lse), 0.0)
        ds = p * (tl.reduce(do * v0[None, :], 1, _add) - delta)
        dq += ds[:, None] * k0[None, :]
    n_off = tl.load(NOFF + h)
    for i in range(0, n_off):
        s_off = tl.load(OFF + h * MAX_OFF + i)
        j = t + s_off
        ok = row_ok & (j >= 0) & (j < N) & ((s_off != 0) | (diag != 0))
        tile = ok[:, None] & dmask[None, :]
        k = tl.load(kbase + (j + HAS_CLS)[:, None] * skl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        v = tl.load(vbase + (j + HAS_CLS)[:, None] * svl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp2(tl.reduce(q * k, 1, _add) * qk_scale - lse), 0.0)
        ds = p * (tl.reduce(do * v, 1, _add) - delta)
        dq += ds[:, None] * k
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgl + dd[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qtile)


@triton.jit
def _patch_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, OFF, NOFF, DIAG,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sgb, sgh, sgl,
                    H, N, L, MAX_OFF, qk_scale, sm_scale,
                    HAS_CLS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK and dV of one block of patch keys ``j``: the queries ``j - s`` of every offset ``s`` (the
    transpose of the pattern, still one contiguous shifted block per offset), and the CLS query."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    b = bh // H
    h = bh % H
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    col_ok = j < N
    dmask = dd < D
    cols = j + HAS_CLS
    ktile = col_ok[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skl + dd[None, :], mask=ktile, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + dd[None, :], mask=ktile, other=0.0).to(tl.float32)
    diag = tl.load(DIAG + h * N + j, mask=col_ok, other=0)  # offset 0 pairs query j with key j
    qbase = Q + b * sqb + h * sqh
    dobase = DO + b * sdb + h * sdh
    dk = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if HAS_CLS:  # the CLS row attends every key
        q0 = tl.load(qbase + dd, mask=dmask, other=0.0).to(tl.float32)
        do0 = tl.load(dobase + dd, mask=dmask, other=0.0).to(tl.float32)
        lse0 = tl.load(LSE + bh * L)
        delta0 = tl.load(DELTA + bh * L)
        p = tl.where(col_ok, tl.exp2(tl.reduce(k * q0[None, :], 1, _add) * qk_scale - lse0), 0.0)
        dv += p[:, None] * do0[None, :]
        ds = p * (tl.reduce(v * do0[None, :], 1, _add) - delta0)
        dk += ds[:, None] * q0[None, :]
    n_off = tl.load(NOFF + h)
    for i in range(0, n_off):
        s_off = tl.load(OFF + h * MAX_OFF + i)
        qi = j - s_off
        ok = col_ok & (qi >= 0) & (qi < N) & ((s_off != 0) | (diag != 0))
        tile = ok[:, None] & dmask[None, :]
        rows = qi + HAS_CLS
        q = tl.load(qbase + rows[:, None] * sql + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        do = tl.load(dobase + rows[:, None] * sdl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * L + rows, mask=ok, other=0.0)
        delta = tl.load(DELTA + bh * L + rows, mask=ok, other=0.0)
        p = tl.where(ok, tl.exp2(tl.reduce(q * k, 1, _add) * qk_scale - lse), 0.0)
        dv += p[:, None] * do
        ds = p * (tl.reduce(do * v, 1, _add) - delta)
        dk += ds[:, None] * q
    out = b * sgb + h * sgh + cols[:, None] * sgl + dd[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=ktile)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ktile)


@triton.jit
def _cls_bwd_partial(Q, K, V, DO, LSE, DELTA, PDQ, PDK, PDV,
                     sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                     H, L, CHUNK, NSPLIT, qk_scale,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Over rows ``r`` in one chunk of ``[0, L)``: the CLS row's dQ part (query 0, keys ``r``) and the
    CLS column's dK/dV parts (queries ``r``, key 0); entry (0, 0) belongs to both, once each."""
    bh = tl.program_id(0).to(tl.int64)  # int64 addresses: b * stride_b passes 2**31 on big tensors
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    qbase = Q + b * sqb + h * sqh
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    dobase = DO + b * sdb + h * sdh
    q0 = tl.load(qbase + dd, mask=dmask, other=0.0).to(tl.float32)
    k0 = tl.load(kbase + dd, mask=dmask, other=0.0).to(tl.float32)
    v0 = tl.load(vbase + dd, mask=dmask, other=0.0).to(tl.float32)
    do0 = tl.load(dobase + dd, mask=dmask, other=0.0).to(tl.float32)
    lse0 = tl.load(LSE + bh * L)
    delta0 = tl.load(DELTA + bh * L)
    dq0 = tl.full([BLOCK_D], 0.0, tl.float32)
    dk0 = tl.full([BLOCK_D], 0.0, tl.float32)
    dv0 = tl.full([BLOCK_D], 0.0, tl.float32)
    start = split * CHUNK
    for r0 in range(start, start + CHUNK, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        ok = r < L
        tile = ok[:, None] & dmask[None, :]
        k = tl.load(kbase + r[:, None] * skl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        v = tl.load(vbase + r[:, None] * svl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp2(tl.reduce(k * q0[None, :], 1, _add) * qk_scale - lse0), 0.0)
        ds = p * (tl.reduce(v * do0[None, :], 1, _add) - delta0)
        dq0 += tl.reduce(ds[:, None] * k, 0, _add)
        q = tl.load(qbase + r[:, None] * sql + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        do = tl.load(dobase + r[:, None] * sdl + dd[None, :], mask=tile, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * L + r, mask=ok, other=0.0)
        delta = tl.load(DELTA + bh * L + r, mask=ok, other=0.0)
        p2 = tl.where(ok, tl.exp2(tl.reduce(q * k0[None, :], 1, _add) * qk_scale - lse), 0.0)
        ds2 = p2 * (tl.reduce(do * v0[None, :], 1, _add) - delta)
        dk0 += tl.reduce(ds2[:, None] * q, 0, _add)
        dv0 += tl.reduce(p2[:, None] * do, 0, _add)
    base = (bh * NSPLIT + split) * BLOCK_D + dd
    tl.store(PDQ + base, dq0)
    tl.store(PDK + base, dk0)
    tl.store(PDV + base, dv0)
