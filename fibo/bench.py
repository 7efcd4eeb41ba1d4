"""``fibo-bench`` (or ``python -m fibo.bench``): the cost of Fibottention per attention backend.

For each sequence size N (patch tokens; one CLS token is added) it measures, with H heads of
width d in fp32 and all backends interleaved round-robin so machine load hits them alike:

* forward and forward+backward wall time (median and inter-quartile range, milliseconds) of one
  attention call on ``(B, H, N+1, d)`` tensors, and the ratio to dense SDPA (no mask) measured in
  the same run;
* peak memory (MiB) above the inputs during forward+backward: the process's peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc's mmap threshold pinned to 64 KiB so
  freed tensors go back to the OS (Linux; ``nan`` elsewhere); on CUDA ``max_memory_allocated``;
* the pattern's build cost: index table (sparse), dense boolean mask (sdpa_mask), block mask (flex):
  time (ms) and memory (MiB);
* the memory-traffic limit of each pass: the bytes it must move at the least (forward: read q, k, v,
  write out and the log-sum-exp; backward: read q, k, v, out, dout and the log-sum-exp, write dq,
  dk, dv; each once), the machine's bandwidth measured in the same run (a STREAM-style copy of
  ``STREAM_MIB`` MiB, best of 5, counting read + write bytes) and bytes / bandwidth in ms, beside
  the measured times (the backward's time is fwd+bwd minus fwd, medians);

and the end-to-end training throughput (samples/s, AdamW steps on random data) of ViT-S/16 at
224 px and (not with ``--quick``) ViT-S/8 at 224 px (784 tokens) and a joint space-time
TimeSformer-S over 8 x 196 patch tokens: dense attention, Fibottention (``backend: auto``) and the
same model with attention replaced by a zero-cost stand-in (``free``: the attention output is v),
whose speed-up over dense is the Amdahl limit of any attention kernel for that model.

Backends: ``dense`` (SDPA without mask, the reference), ``sdpa_mask`` (SDPA with the boolean
Fibottention mask: the dense-mask path), ``sparse`` (the fused CPU kernel of
:mod:`fibo.attention.sparse`), ``flex`` (FlexAttention, CUDA only: on the CPU it has no backward).

Writes ``<out>/<stem>.csv`` and ``<out>/<stem>.md`` (default ``experiments/sparse_attention_benchmark``; ``--quick``: ``logs/bench/``)
and, with ``--mlflow``, one MLflow run (experiment ``fibo-bench``) with every number as a metric
and both files as artifacts.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fibo.attention.backends import AttentionCall, choose_backend
from fibo.attention.backends.base import Backend

FULL_SIZES = (196, 784, 1568, 3136, 6272, 12544)
QUICK_SIZES = (196, 784, 3136)
TARGETS = ("sparse fwd+bwd <= 0.30x dense at N=196 and <= 0.05x at N >= 3136; fwd <= 0.15x at N=196; "
           "backward <= 2.5x forward; every pass within 3x of its memory-traffic limit; ViT-S/16 training within 10% "
           "of its Amdahl limit; ViT-S/8 (784 tokens) >= 1.5x dense; joint TimeSformer 8 x 196 >= 2x dense")
#: size of the STREAM-style copy (MiB per array; above the last-level cache of common CPUs).
STREAM_MIB = 256


# ------------------------------------------------------------------ memory

def _pin_malloc() -> None:
    try:  # M_MMAP_THRESHOLD = -3: big blocks are mmapped and returned to the OS on free
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def _reset_peak() -> float:
    """Reset the peak RSS; return the current RSS (KiB)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    return _status_kib("VmRSS")


def measure_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) ``fn`` adds above what is live when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _reset_peak()
    fn()
    return max(0.0, (_status_kib("VmHWM") - base) / 1024)


# ------------------------------------------------------------------ timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _stats(times: list[float]) -> tuple[float, float]:
    """(median, inter-quartile range) in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) < 4:
        return statistics.median(ms), ms[-1] - ms[0]
    q = statistics.quantiles(ms, n=4)
    return statistics.median(ms), q[2] - q[0]


def round_robin(fns: dict[str, Callable[[], object]], device, budget_s: float, min_reps: int, max_reps: int) -> dict[str, list[float]]:
    """Warm each fn up once, then time them in turns until ``budget_s`` or ``max_reps``."""
    times = {k: [] for k in fns}
    first = {k: _timed(f, device) for k, f in fns.items()}  # warm-up (compilation, caches)
    per_round = max(sum(first.values()), 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / per_round)))
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(_timed(f, device))
    return times


# ------------------------------------------------------------------ memory traffic

def stream_bandwidth(device: torch.device, mib: int = STREAM_MIB, reps: int = 5) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s): ``dst.copy_(src)`` of two ``mib`` MiB fp32 arrays, read +
    write bytes counted (STREAM's "copy"), best of ``reps`` after one warm-up."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(reps))
    return 2 * src.numel() * 4 / best / 1e9


def pass_bytes(batch: int, heads: int, seq_len: int, dim: int, elem: int = 4) -> dict[str, int]:
    """The bytes each attention pass must move at the least: ``fwd`` reads q, k, v and writes out and
    the log-sum-exp; ``bwd`` reads q, k, v, out, dout and the log-sum-exp and writes dq, dk, dv."""
    t, lse = batch * heads * seq_len * dim * elem, batch * heads * seq_len * elem
    return {"fwd": 4 * t + lse, "bwd": 8 * t + lse}


# ------------------------------------------------------------------ attention kernels

def attention_rows(n: int, heads: int, dim: int, batch: int, backends: list[str], device: torch.device,
                   budget_s: float, pattern: dict, max_mask_bytes: int = 2**28, min_reps: int = 3,
                   bandwidth_gbs: float = math.nan) -> list[dict]:
    """One row per backend at N patch tokens (times in ms, ratios to dense; see the module docstring);
    every row also carries the pass traffic (bytes) and its limit (ms) at ``bandwidth_gbs``."""
    from fibo.attention import PATTERNS

    L = n + 1
    opts = {k: v for k, v in pattern.items() if k != "name"}
    layout = PATTERNS[pattern["name"]](**opts).layout(n, heads, 0, True)
    meta: dict[str, dict] = {}
    fwd: dict[str, Callable] = {}
    fb: dict[str, Callable] = {}
    g = torch.Generator(device="cpu").manual_seed(n)
    q, k, v = (torch.randn(batch, heads, L, dim, generator=g).to(device).requires_grad_(True) for _ in range(3))
    grad = torch.randn(batch, heads, L, dim, generator=g).to(device)

    def make(f):
        def run_fwd():
            with torch.no_grad():
                return f()

        def run_fb():
            out = f()
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        return run_fwd, run_fb

    for b in backends:
        info: dict = {"build_ms": 0.0, "build_mib": 0.0, "note": ""}
        if b == "dense":
            f = lambda: F.scaled_dot_product_attention(q, k, v)
        elif b == "sdpa_mask":
            mask_bytes = heads * L * L
            if mask_bytes > max_mask_bytes:
                meta[b] = {**info, "note": f"skipped: dense mask of {mask_bytes / 2**20:.0f} MiB (slowest path)"}
                continue
            t = time.perf_counter()
            mask = layout.mask().to(device)
            info.update(build_ms=(time.perf_counter() - t) * 1e3, build_mib=mask.numel() / 2**20)
            f = lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif b == "sparse":
            from fibo.attention.backends.cpu_sparse import extension_available, sparse_attention

            if device.type != "cpu" or not extension_available():
                meta[b] = {**info, "note": "skipped: CPU kernel unavailable on this device"}
                continue
            t = time.perf_counter()
            table = layout.table()
            info.update(build_ms=(time.perf_counter() - t) * 1e3, build_mib=table.nbytes / 2**20)
            f = lambda table=table: sparse_attention(q, k, v, table)
        elif b == "flex":
            from fibo.attention.backends.flex import block_mask, flex_attention

            if device.type != "cuda":
                meta[b] = {**info, "note": "skipped: FlexAttention has no CPU backward (GPU: scripts/gpu_check.py)"}
                continue
            t = time.perf_counter()
            bm = block_mask(layout, device)
            _sync(device)
            info.update(build_ms=(time.perf_counter() - t) * 1e3,
                        build_mib=sum(x.numel() * x.element_size() for x in bm.as_tuple() if torch.is_tensor(x)) / 2**20)
            f = lambda bm=bm: flex_attention(q, k, v, bm)
        else:
            raise ValueError(f"unknown backend {b!r}")
        meta[b] = info
        fwd[b], fb[b] = make(f)

    if "dense" not in fwd:
        raise ValueError("the dense backend is the reference and must be measured")
    small = n <= 1568
    t_fwd = round_robin(fwd, device, budget_s / 3, min_reps, 30 if small else 10)
    t_fb = round_robin(fb, device, 2 * budget_s / 3, min_reps, 20 if small else 7)
    peaks = {b: measure_peak_mib(fb[b], device) for b in fb}
    ref_fwd, ref_fb = _stats(t_fwd["dense"])[0], _stats(t_fb["dense"])[0]
    dens = layout.density()["density"]
    traffic = pass_bytes(batch, heads, L, dim)
    limit = {k: v / (bandwidth_gbs * 1e9) * 1e3 for k, v in traffic.items()}
    rows = []
    for b in backends:
        info = meta.get(b, {"note": "skipped"})
        row = {"N": n, "L": L, "B": batch, "H": heads, "d": dim, "backend": b,
               "density": 1.0 if b == "dense" else dens, "bytes_fwd": traffic["fwd"], "bytes_bwd": traffic["bwd"],
               "bandwidth_gbs": bandwidth_gbs, "limit_fwd_ms": limit["fwd"], "limit_bwd_ms": limit["bwd"]}
        if b in fwd:
            (fm, fi), (bm_, bi) = _stats(t_fwd[b]), _stats(t_fb[b])
            row.update(fwd_ms=fm, fwd_iqr_ms=fi, fwd_ratio=fm / ref_fwd, fb_ms=bm_, fb_iqr_ms=bi, fb_ratio=bm_ / ref_fb,
                       bwd_ms=bm_ - fm, reps=f"{len(t_fwd[b])}/{len(t_fb[b])}", peak_mib=peaks[b])
        row.update(build_ms=info.get("build_ms", math.nan), build_mib=info.get("build_mib", math.nan), note=info.get("note", ""))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ end to end

E2E_MODELS = {
    # label: (registry name, model kwargs, input shape without batch, patch tokens per attention call)
    "vit_small_patch16_224": ("vit_small", dict(img_size=224, patch_size=16), (3, 224, 224), 196),
    "vit_small_patch8_224": ("vit_small", dict(img_size=224, patch_size=8), (3, 224, 224), 784),
    "timesformer_small_joint_8x196": ("timesformer_small", dict(img_size=224, patch_size=16, num_frames=8,
                                                                attention_type="joint", drop_path_rate=0.0),
                                      (3, 8, 224, 224), 8 * 196),
}
#: the attention variants of each end-to-end row: label -> attention config (``free``: see :class:`FreeAttention`).
E2E_VARIANTS = {"dense": {"name": "dense"}, "fibottention": {"name": "fibottention", "backend": "auto"},
                "free": {"name": "dense"}}


class FreeAttention(Backend):
    """The zero-cost stand-in for attention (benchmark only): returns ``v`` as the attention output, so
    the model keeps its qkv and proj linears (and gradients reach them) but attention costs nothing.
    A model's speed with it is the Amdahl limit of any attention kernel."""

    name = "free"

    def prepare(self, layer, num_tokens, device):
        return None

    def forward(self, q, k, v, prepared, dropout_p=0.0):
        return v


FREE = FreeAttention()


def _make_free(model: torch.nn.Module) -> torch.nn.Module:
    """Every :class:`fibo.attention.Attention` of ``model`` computes with :data:`FREE`."""
    from fibo.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.backend_for = lambda *args, **kwargs: FREE
    return model


def train_throughput(label: str, batch: int, steps: int, device: torch.device, budget_s: float) -> list[dict]:
    """Training samples/s (forward, backward, AdamW step; random data) of ``E2E_MODELS[label]``:
    dense, Fibottention (``backend: auto``) and ``free`` (:class:`FreeAttention`: the Amdahl limit),
    steps interleaved round-robin. Each row has ``ratio_to_dense`` (samples/s over dense's) and
    ``amdahl_limit`` (free's ratio); the Fibottention row also ``share_of_limit`` = ratio / limit."""
    from fibo.models.registry import create_model

    name, kwargs, shape, tokens = E2E_MODELS[label]
    models, opts = {}, {}
    for attn_name, attn in E2E_VARIANTS.items():
        torch.manual_seed(0)
        m = create_model(name, num_classes=100, attention=attn, **kwargs).to(device)
        if attn_name == "free":
            _make_free(m)
        models[attn_name] = m.train()
        opts[attn_name] = torch.optim.AdamW(m.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)

    def step(key):
        def run():
            opts[key].zero_grad(set_to_none=True)
            F.cross_entropy(models[key](x), y).backward()
            opts[key].step()
        return run

    times = round_robin({k: step(k) for k in models}, device, budget_s, min(2, steps), steps)
    call = AttentionCall(device, torch.float32, tokens, requires_grad=True, offset_pattern=True)
    used = {"dense": "sdpa", "fibottention": choose_backend("auto", call).name, "free": FREE.name}
    rows = []
    for key, ts in times.items():
        med, iqr = _stats(ts)
        rows.append({"model": label, "attention": key, "backend": used[key], "batch": batch,
                     "step_ms": med, "step_iqr_ms": iqr, "images_per_s": batch / (med / 1e3),
                     "density": models[key].attention_density()["density"] if key != "free" else 0.0, "steps": len(ts)})
    by = {r["attention"]: r for r in rows}
    limit = by["free"]["images_per_s"] / by["dense"]["images_per_s"]
    for r in rows:
        r["ratio_to_dense"] = r["images_per_s"] / by["dense"]["images_per_s"]
        r["amdahl_limit"] = limit
        r["share_of_limit"] = r["ratio_to_dense"] / limit if r["attention"] == "fibottention" else math.nan
    return rows


# ------------------------------------------------------------------ output

def _fmt(x, nd=2):
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}")
    return str(x)


CSV_KEYS = ["N", "L", "B", "H", "d", "backend", "density", "fwd_ms", "fwd_iqr_ms", "fwd_ratio", "fb_ms", "fb_iqr_ms",
            "fb_ratio", "bwd_ms", "peak_mib", "build_ms", "build_mib", "reps", "note", "bytes_fwd", "bytes_bwd",
            "bandwidth_gbs", "limit_fwd_ms", "limit_bwd_ms"]
E2E_KEYS = ["model", "attention", "batch", "step_ms", "step_iqr_ms", "images_per_s", "ratio_to_dense", "steps",
            "amdahl_limit", "share_of_limit"]
_TIMED = ("fwd_ms", "fwd_iqr_ms", "fwd_ratio", "fb_ms", "fb_iqr_ms", "fb_ratio", "bwd_ms", "peak_mib", "reps")


def read_csv(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The attention rows and end-to-end rows of a CSV that :func:`main` wrote, typed as
    :func:`main` had them, so that :func:`markdown` renders the same table again."""
    def typed(key, value):
        if key in ("backend", "reps", "note", "model", "attention"):
            return value
        if value == "":
            return math.nan
        return int(value) if key in ("N", "L", "B", "H", "d", "batch", "steps", "bytes_fwd", "bytes_bwd") else float(value)

    rows, e2e = [], []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            if raw["model"]:
                e2e.append({k: typed(k, raw[k]) for k in E2E_KEYS + ["backend", "density"]})
            else:
                row = {k: typed(k, raw.get(k, "")) for k in CSV_KEYS}
                if raw["fwd_ms"] == "":  # a skipped backend has no timings
                    row = {k: v for k, v in row.items() if k not in _TIMED}
                rows.append(row)
    return rows, e2e


def _commit() -> str:
    """The checkout's git commit (short), with ``+dirty`` for uncommitted changes; ``unknown`` outside git."""
    from fibo.tracking import git_commit

    commit, dirty = git_commit(Path(__file__).resolve().parents[1])
    return f"{commit[:7]}{'+dirty' if dirty else ''}" if commit else "unknown"


def _x(a: float, b: float) -> str:
    return _fmt(a / b, 2) + "x" if b and not math.isnan(a) and not math.isnan(b) else "nan"


def traffic_lines(rows) -> list[str]:
    """Per N: the bytes each pass must move, the bandwidth, the limit in ms, beside the sparse
    kernel's (else dense's) measured times and the measured / limit factors."""
    lines = ["## Memory-traffic limit per pass", "",
             "Bytes: forward reads q, k, v and writes out + log-sum-exp; backward reads q, k, v, out, dout + "
             "log-sum-exp and writes dq, dk, dv (each once). Bandwidth: STREAM-style copy measured in this run "
             f"({STREAM_MIB} MiB arrays, read + write bytes, best of 5). Limit = bytes / bandwidth. "
             "bwd ms = fwd+bwd minus fwd (medians).", "",
             "| N | B | backend | fwd MB | bwd MB | GB/s | fwd limit ms | fwd ms | fwd / limit | bwd limit ms | bwd ms | "
             "bwd / limit | fwd+bwd limit ms | fwd+bwd ms | fwd+bwd / limit | bwd / fwd |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_n: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_n.setdefault(r["N"], {})[r["backend"]] = r
    for n, per in by_n.items():
        r = per.get("sparse") if "fwd_ms" in per.get("sparse", {}) else per.get("dense")
        if r is None or "fwd_ms" not in r or "bytes_fwd" not in r:
            continue
        lf, lb = r["limit_fwd_ms"], r["limit_bwd_ms"]
        lines.append(f"| {n} | {r['B']} | {r['backend']} | {r['bytes_fwd'] / 1e6:.2f} | {r['bytes_bwd'] / 1e6:.2f} | "
                     f"{_fmt(r['bandwidth_gbs'], 1)} | {_fmt(lf, 3)} | {_fmt(r['fwd_ms'])} | {_x(r['fwd_ms'], lf)} | "
                     f"{_fmt(lb, 3)} | {_fmt(r['bwd_ms'])} | {_x(r['bwd_ms'], lb)} | {_fmt(lf + lb, 3)} | "
                     f"{_fmt(r['fb_ms'])} | {_x(r['fb_ms'], lf + lb)} | {_x(r['bwd_ms'], r['fwd_ms'])} |")
    return lines


def markdown(rows, e2e_rows, args, env: dict) -> str:
    lines = [
        "# Sparse attention benchmark (Fibottention)",
        "",
        f"Command: `{env['command']}`  ",
        f"Machine: {env['machine']}; torch {torch.__version__}, {env['threads']} threads; device {env['device']}; "
        f"fp32, H={args.heads}, d={args.head_dim}, pattern `{args.pattern}` (layer 0), one CLS token.  ",
        f"Commit: {env.get('commit', 'unknown')}. Seeds: q, k, v and dout are drawn from a torch.Generator "
        "seeded with N, the training rows' models from torch.manual_seed(0) and their batch from a Generator "
        "seeded with 0 (the same inputs every run); spread = IQR over the repeats of column reps.  ",
        f"Date: {env['date']}. Ratios are to dense SDPA (no mask) measured in the same run, backends "
        "interleaved round-robin; times are medians (IQR = inter-quartile range) in ms; peak = memory "
        "added during one forward+backward (MiB); build = index table / mask / block mask.",
        "",
        f"Targets: {TARGETS}.",
        "",
        "| N | B | backend | density | fwd ms (IQR) | fwd ratio | fwd+bwd ms (IQR) | fwd+bwd ratio | bwd / fwd | peak MiB | build ms | build MiB | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "fwd_ms" in r:
            bwd = r.get("bwd_ms", r["fb_ms"] - r["fwd_ms"])
            lines.append(
                f"| {r['N']} | {r['B']} | {r['backend']} | {100 * r['density']:.2f}% | {_fmt(r['fwd_ms'])} ({_fmt(r['fwd_iqr_ms'])}) | "
                f"{_fmt(r['fwd_ratio'], 3)} | {_fmt(r['fb_ms'])} ({_fmt(r['fb_iqr_ms'])}) | {_fmt(r['fb_ratio'], 3)} | "
                f"{_fmt(bwd / r['fwd_ms'], 2)} | {_fmt(r['peak_mib'], 1)} | {_fmt(r['build_ms'])} | {_fmt(r['build_mib'], 3)} | {r['note']} |")
        else:
            lines.append(f"| {r['N']} | {r['B']} | {r['backend']} | {100 * r['density']:.2f}% | | | | | | | | | {r['note']} |")
    lines += [""] + traffic_lines(rows)
    lines += ["", "## End to end: training throughput (AdamW, random data; samples = images or clips)", "",
              "free = the same model with attention replaced by a zero-cost stand-in (output = v): its ratio to "
              "dense is the Amdahl limit of any attention kernel; share of limit = Fibottention's ratio / that limit.", ""]
    if e2e_rows:
        lines += ["| model | attention | backend | batch | step ms (IQR) | samples/s | ratio to dense | Amdahl limit | share of limit | density | steps |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in e2e_rows:
            lines.append(f"| {r['model']} | {r['attention']} | {r['backend']} | {r['batch']} | {_fmt(r['step_ms'], 0)} ({_fmt(r['step_iqr_ms'], 0)}) | "
                         f"{_fmt(r['images_per_s'])} | {_fmt(r['ratio_to_dense'], 3)} | {_fmt(r.get('amdahl_limit', math.nan), 3)} | "
                         f"{_fmt(r.get('share_of_limit', math.nan), 3)} | {100 * r['density']:.2f}% | {r['steps']} |")
    else:
        lines.append("(skipped: --no-e2e)")
    lines.append("")
    return "\n".join(lines)


def _positive_ints(text: str) -> list[int]:
    """``"196,784"`` -> ``[196, 784]``; argparse's error for anything but positive integers."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive token counts, e.g. 196,784")
    return values


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive integer")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fibo-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"N in {QUICK_SIZES}, short budgets, dense-mask path only up to N=784, batch-2 ViT (about a minute)")
    p.add_argument("--sizes", type=_positive_ints, default=None,
                   help=f"comma-separated N (default {','.join(map(str, FULL_SIZES))})")
    p.add_argument("--heads", type=_positive_int, default=12)
    p.add_argument("--head-dim", type=_positive_int, default=64)
    p.add_argument("--batch", type=_positive_int, default=None, help="attention batch (default max(1, 1568 // N))")
    p.add_argument("--backends", default=None, help="comma-separated: dense,sdpa_mask,sparse,flex (default: by device)")
    p.add_argument("--pattern", default="fibottention", choices=["fibottention", "fibottention_modified"])
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per N (default 20, quick 3)")
    p.add_argument("--e2e-batch", type=_positive_int, default=None, help="ViT-S/16 batch (default 16, quick 2; ViT-S/8: a quarter of it)")
    p.add_argument("--e2e-steps", type=_positive_int, default=None, help="max timed steps per model (default 6, quick 1)")
    p.add_argument("--no-e2e", action="store_true", help="skip the training-throughput rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None,
                   help="output folder (default experiments/, or logs/bench/ with --quick so that a smoke run leaves the recorded results alone)")
    p.add_argument("--stem", default=None, help="file name stem (default sparse_attention_benchmark[_quick][_cuda])")
    p.add_argument("--mlflow", action="store_true", help="log to MLflow ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _pin_malloc()
    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 20.0)
    backends = args.backends.split(",") if args.backends else (
        ["dense", "sdpa_mask", "flex"] if device.type == "cuda" else ["dense", "sdpa_mask", "sparse"])
    pattern = {"name": "fibottention", "modified": args.pattern == "fibottention_modified"}
    if "sparse" in backends and device.type == "cpu":
        from fibo.attention.backends.cpu_sparse import load_extension

        t = time.perf_counter()
        load_extension()
        print(f"fibo-bench: sparse kernel ready in {time.perf_counter() - t:.1f} s", flush=True)
    bandwidth = stream_bandwidth(device, 64 if args.quick else STREAM_MIB)
    print(f"fibo-bench: copy bandwidth {bandwidth:.1f} GB/s (STREAM-style, read + write bytes)", flush=True)
    rows = []
    for n in sizes:
        batch = args.batch or max(1, 1568 // n)
        new = attention_rows(n, args.heads, args.head_dim, batch, backends, device, budget, pattern,
                             max_mask_bytes=2**24 if args.quick else 2**28, min_reps=2 if args.quick else 3,
                             bandwidth_gbs=bandwidth)
        rows += new
        for r in new:
            if "fwd_ms" in r:
                print(f"N={n:6d} B={batch:2d} {r['backend']:10s} fwd {r['fwd_ms']:9.2f} ms ({r['fwd_ratio']:.3f}x, "
                      f"{r['fwd_ms'] / r['limit_fwd_ms']:.1f}x limit {r['limit_fwd_ms']:.2f} ms)  "
                      f"fwd+bwd {r['fb_ms']:9.2f} ms ({r['fb_ratio']:.3f}x)  bwd {r['bwd_ms']:8.2f} ms "
                      f"({r['bwd_ms'] / r['limit_bwd_ms']:.1f}x limit {r['limit_bwd_ms']:.2f} ms; {r['bwd_ms'] / r['fwd_ms']:.2f}x fwd)  "
                      f"peak {r['peak_mib']:8.1f} MiB  build {r['build_ms']:8.2f} ms / {r['build_mib']:.3f} MiB", flush=True)
            else:
                print(f"N={n:6d} {r['backend']:10s} {r['note']}", flush=True)
    e2e = []
    if not args.no_e2e:
        steps = args.e2e_steps or (1 if args.quick else 6)
        vit_batch = args.e2e_batch or (2 if args.quick else 16)
        e2e = train_throughput("vit_small_patch16_224", vit_batch, steps, device, 5.0 if args.quick else 90.0)
        if not args.quick:  # 785 and 1569 tokens: seconds per step with dense attention on a CPU
            e2e += train_throughput("vit_small_patch8_224", max(1, vit_batch // 4), min(steps, 4), device, 120.0)
            e2e += train_throughput("timesformer_small_joint_8x196", 1, min(steps, 3), device, 120.0)
        for r in e2e:
            print(f"{r['model']} train {r['attention']:12s} ({r['backend']}): {r['images_per_s']:.2f} samples/s "
                  f"({r['ratio_to_dense']:.3f}x dense; Amdahl limit {r['amdahl_limit']:.3f}x)", flush=True)
    env = {"command": "fibo-bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
           "threads": torch.get_num_threads(), "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}
    stem = args.stem or ("sparse_attention_benchmark" + ("_quick" if args.quick else "") + ("_cuda" if device.type == "cuda" else ""))
    out = Path(args.out or ("logs/bench" if args.quick else "experiments"))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS + E2E_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        w.writerows(e2e)
    md_path.write_text(markdown(rows, e2e, args, env))
    print(f"fibo-bench: wrote {csv_path} and {md_path}")
    if args.mlflow:
        _log_mlflow(rows, e2e, args, csv_path, md_path)
    return 0


def _log_mlflow(rows, e2e, args, csv_path, md_path) -> None:
    import mlflow

    from fibo.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(None, str(Path.cwd() / "mlflow.db")))
    mlflow.set_experiment("fibo-bench")
    with mlflow.start_run(run_name=csv_path.stem):
        mlflow.log_params({"heads": args.heads, "head_dim": args.head_dim, "pattern": args.pattern, "quick": args.quick,
                           "device": args.device, "torch": torch.__version__})
        for r in rows:
            for key in ("fwd_ms", "fb_ms", "bwd_ms", "fwd_ratio", "fb_ratio", "peak_mib", "build_ms", "build_mib",
                        "limit_fwd_ms", "limit_bwd_ms"):
                if key in r and not (isinstance(r[key], float) and math.isnan(r[key])):
                    mlflow.log_metric(f"{r['backend']}/{key}", r[key], step=r["N"])
        for r in e2e:
            mlflow.log_metric(f"{r['model']}/{r['attention']}/samples_per_s", r["images_per_s"])
            mlflow.log_metric(f"{r['model']}/amdahl_limit", r["amdahl_limit"])
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))


if __name__ == "__main__":
    sys.exit(main())
