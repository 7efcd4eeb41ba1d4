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

and the end-to-end training throughput (samples/s, AdamW steps on random data) of ViT-S/16 at
224 px and (not with ``--quick``) of a joint space-time TimeSformer-S over 8 x 196 patch tokens,
dense attention vs Fibottention (``backend: auto``).

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

FULL_SIZES = (196, 784, 1568, 3136, 6272, 12544)
QUICK_SIZES = (196, 784, 3136)
TARGETS = "fwd+bwd <= 1.0x dense at N=196 and <= 0.2x at N >= 3136; fwd <= 0.2x at N >= 784; ViT-S/16 training images/s fibottention >= dense"


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


# ------------------------------------------------------------------ attention kernels

def attention_rows(n: int, heads: int, dim: int, batch: int, backends: list[str], device: torch.device,
                   budget_s: float, pattern: dict, max_mask_bytes: int = 2**28, min_reps: int = 3) -> list[dict]:
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
    rows = []
    for b in backends:
        info = meta.get(b, {"note": "skipped"})
        row = {"N": n, "L": L, "B": batch, "H": heads, "d": dim, "backend": b,
               "density": 1.0 if b == "dense" else dens}
        if b in fwd:
            (fm, fi), (bm_, bi) = _stats(t_fwd[b]), _stats(t_fb[b])
            row.update(fwd_ms=fm, fwd_iqr_ms=fi, fwd_ratio=fm / ref_fwd, fb_ms=bm_, fb_iqr_ms=bi, fb_ratio=bm_ / ref_fb,
                       reps=f"{len(t_fwd[b])}/{len(t_fb[b])}", peak_mib=peaks[b])
        row.update(build_ms=info.get("build_ms", math.nan), build_mib=info.get("build_mib", math.nan), note=info.get("note", ""))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ end to end

E2E_MODELS = {
    # label: (registry name, model kwargs, input shape without batch, patch tokens per attention call)
    "vit_small_patch16_224": ("vit_small", dict(img_size=224, patch_size=16), (3, 224, 224), 196),
    "timesformer_small_joint_8x196": ("timesformer_small", dict(img_size=224, patch_size=16, num_frames=8,
                                                                attention_type="joint", drop_path_rate=0.0),
                                      (3, 8, 224, 224), 8 * 196),
}


def train_throughput(label: str, batch: int, steps: int, device: torch.device, budget_s: float) -> list[dict]:
    """Training samples/s (forward, backward, AdamW step; random data) of ``E2E_MODELS[label]``,
    dense vs Fibottention (``backend: auto``), steps interleaved round-robin."""
    from fibo.attention.backends import resolve_backend
    from fibo.models.registry import create_model

    name, kwargs, shape, tokens = E2E_MODELS[label]
    models, opts = {}, {}
    for attn_name, attn in (("dense", {"name": "dense"}), ("fibottention", {"name": "fibottention", "backend": "auto"})):
        torch.manual_seed(0)
        m = create_model(name, num_classes=100, attention=attn, **kwargs).to(device)
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
    used = resolve_backend("auto", device=device, num_tokens=tokens, dtype=torch.float32)
    rows = []
    for key, ts in times.items():
        med, iqr = _stats(ts)
        rows.append({"model": label, "attention": key, "backend": "sdpa" if key == "dense" else used, "batch": batch,
                     "step_ms": med, "step_iqr_ms": iqr, "images_per_s": batch / (med / 1e3),
                     "density": models[key].attention_density()["density"], "steps": len(ts)})
    dense_ips = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_to_dense"] = r["images_per_s"] / dense_ips
    return rows


# ------------------------------------------------------------------ output

def _fmt(x, nd=2):
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}")
    return str(x)


CSV_KEYS = ["N", "L", "B", "H", "d", "backend", "density", "fwd_ms", "fwd_iqr_ms", "fwd_ratio", "fb_ms", "fb_iqr_ms",
            "fb_ratio", "peak_mib", "build_ms", "build_mib", "reps", "note"]
E2E_KEYS = ["model", "attention", "batch", "step_ms", "step_iqr_ms", "images_per_s", "ratio_to_dense", "steps"]


def read_csv(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The attention rows and end-to-end rows of a CSV that :func:`main` wrote, typed as
    :func:`main` had them, so that :func:`markdown` renders the same table again."""
    def typed(key, value):
        if key in ("backend", "reps", "note", "model", "attention"):
            return value
        if value == "":
            return math.nan
        return int(value) if key in ("N", "L", "B", "H", "d", "batch", "steps") else float(value)

    rows, e2e = [], []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            if raw["model"]:
                e2e.append({k: typed(k, raw[k]) for k in E2E_KEYS + ["backend", "density"]})
            else:
                row = {k: typed(k, raw[k]) for k in CSV_KEYS}
                if raw["fwd_ms"] == "":  # a skipped backend has no timings
                    row = {k: v for k, v in row.items() if k in ("N", "L", "B", "H", "d", "backend", "density",
                                                                  "build_ms", "build_mib", "note")}
                rows.append(row)
    return rows, e2e


def _commit() -> str:
    """The checkout's git commit (short), with ``+dirty`` for uncommitted changes; ``unknown`` outside git."""
    from fibo.tracking import git_commit

    commit, dirty = git_commit(Path(__file__).resolve().parents[1])
    return f"{commit[:7]}{'+dirty' if dirty else ''}" if commit else "unknown"


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
        "| N | B | backend | density | fwd ms (IQR) | fwd ratio | fwd+bwd ms (IQR) | fwd+bwd ratio | peak MiB | build ms | build MiB | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "fwd_ms" in r:
            lines.append(
                f"| {r['N']} | {r['B']} | {r['backend']} | {100 * r['density']:.2f}% | {_fmt(r['fwd_ms'])} ({_fmt(r['fwd_iqr_ms'])}) | "
                f"{_fmt(r['fwd_ratio'], 3)} | {_fmt(r['fb_ms'])} ({_fmt(r['fb_iqr_ms'])}) | {_fmt(r['fb_ratio'], 3)} | "
                f"{_fmt(r['peak_mib'], 1)} | {_fmt(r['build_ms'])} | {_fmt(r['build_mib'], 3)} | {r['note']} |")
        else:
            lines.append(f"| {r['N']} | {r['B']} | {r['backend']} | {100 * r['density']:.2f}% | | | | | | | | {r['note']} |")
    lines += ["", "## End to end: training throughput (AdamW, random data; samples = images or clips)", ""]
    if e2e_rows:
        lines += ["| model | attention | backend | batch | step ms (IQR) | samples/s | ratio to dense | density | steps |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in e2e_rows:
            lines.append(f"| {r['model']} | {r['attention']} | {r['backend']} | {r['batch']} | {_fmt(r['step_ms'], 0)} ({_fmt(r['step_iqr_ms'], 0)}) | "
                         f"{_fmt(r['images_per_s'])} | {_fmt(r['ratio_to_dense'], 3)} | {100 * r['density']:.2f}% | {r['steps']} |")
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
    p.add_argument("--e2e-batch", type=_positive_int, default=None, help="ViT-S/16 batch (default 16, quick 4)")
    p.add_argument("--e2e-steps", type=_positive_int, default=None, help="max timed steps per model (default 6, quick 1)")
    p.add_argument("--no-e2e", action="store_true", help="skip the ViT-S/16 training throughput")
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
    rows = []
    for n in sizes:
        batch = args.batch or max(1, 1568 // n)
        new = attention_rows(n, args.heads, args.head_dim, batch, backends, device, budget, pattern,
                             max_mask_bytes=2**24 if args.quick else 2**28, min_reps=2 if args.quick else 3)
        rows += new
        for r in new:
            if "fwd_ms" in r:
                print(f"N={n:6d} B={batch:2d} {r['backend']:10s} fwd {r['fwd_ms']:9.2f} ms ({r['fwd_ratio']:.3f}x)  "
                      f"fwd+bwd {r['fb_ms']:9.2f} ms ({r['fb_ratio']:.3f}x)  peak {r['peak_mib']:8.1f} MiB  "
                      f"build {r['build_ms']:8.2f} ms / {r['build_mib']:.3f} MiB", flush=True)
            else:
                print(f"N={n:6d} {r['backend']:10s} {r['note']}", flush=True)
    e2e = []
    if not args.no_e2e:
        steps = args.e2e_steps or (1 if args.quick else 6)
        e2e = train_throughput("vit_small_patch16_224", args.e2e_batch or (2 if args.quick else 16), steps,
                               device, 5.0 if args.quick else 90.0)
        if not args.quick:  # 1569 tokens per clip: minutes per step with dense attention on a CPU
            e2e += train_throughput("timesformer_small_joint_8x196", 1, min(steps, 3), device, 120.0)
        for r in e2e:
            print(f"{r['model']} train {r['attention']:12s} ({r['backend']}): {r['images_per_s']:.2f} samples/s "
                  f"({r['ratio_to_dense']:.3f}x dense)", flush=True)
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
            for key in ("fwd_ms", "fb_ms", "fwd_ratio", "fb_ratio", "peak_mib", "build_ms", "build_mib"):
                if key in r and not (isinstance(r[key], float) and math.isnan(r[key])):
                    mlflow.log_metric(f"{r['backend']}/{key}", r[key], step=r["N"])
        for r in e2e:
            mlflow.log_metric(f"{r['model']}/{r['attention']}/samples_per_s", r["images_per_s"])
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))


if __name__ == "__main__":
    sys.exit(main())
