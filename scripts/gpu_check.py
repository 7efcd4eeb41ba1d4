"""GPU check of fibo's sparse attention: parity, kernel timings, ViT-B/16 training, the measured ``auto`` rule.

    python3 scripts/gpu_check.py --commit "$(git rev-parse --short HEAD)"   # one GPU, under 8 minutes
    python3 scripts/gpu_check.py --dry-run --out-dir /tmp/x                 # the whole script on the CPU, tiny shapes

Sections, each with its own time budget (``--budgets``; an item that would start after its section's
budget is spent is skipped and its row says why):

1. **parity** (default 45 s): the Triton offset kernel against the float64 dense-mask math path
   (:func:`fibo.attention.backends.sdpa.math_neg_inf`) on the GPU, forward and the three gradients,
   fp32 and bf16 (max error relative to the largest reference entry: 2e-4 / 3e-2), for every offset
   pattern (Fibottention plain and modified, Longformer, dilated, strided Sparse Transformer) with and
   without CLS, odd and even N, B=1, H=1, d=32 and 64; and a ViT-B attention layer with
   ``backend: auto`` against ``backend: sdpa`` (and which backend ``auto`` took).
2. **kernels** (default 240 s): per N patch tokens in 196, 784, 1568, 3136, 6272, 12544 (L = N + 1
   with CLS: 197 ... 12545; B = max(1, 1568 // N), H = 12 as fibo-bench), bf16 and fp32, head dim 64
   (then 32): dense SDPA without a mask (the flash kernel in bf16), the Triton kernel, FlexAttention
   (``torch.compile``-d) and SDPA with the boolean mask, on Fibottention (offset pattern); then
   FlexAttention and masked SDPA on BigBird (mask pattern). Forward (no grad) and forward+backward:
   the median of CUDA-event times after warm-up; the first call (compilation) is timed apart and
   reported as ``first_call_s``; peak memory above the inputs. q, k, v are views of one
   ``(B, L, 3, H, d)`` projection, as in the model.
3. **vit** (default 75 s): ViT-B/16 at 224 px, batch 64, bf16 autocast, AdamW: training images/s of
   dense attention, Fibottention with ``backend: auto`` and Fibottention through masked SDPA, steps
   interleaved round-robin (``--vit-flex`` adds FlexAttention: 12 layers of compilation).

Writes ``<out-dir>/gpu_benchmark.csv`` (one row per parity case, kernel measurement and ViT model;
every row names the commit, device, torch and triton versions) and ``<out-dir>/gpu_benchmark.md``,
and prints the ``auto`` rule the measurements support, as Python to paste over
``CUDA_AUTO_RULE`` / ``CUDA_AUTO_RULE_SOURCE`` in ``fibo/attention/backends/__init__.py`` (each
backend ranked by forward+backward time per N, dtype and head dim). Exit code 1 on a parity failure,
2 without CUDA (unless ``--dry-run``).

``--dry-run`` runs every section on the CPU with tiny shapes (N in 16, 33; H=2; d=16; a 2-layer ViT
at 32 px): the Triton kernel through Triton's interpreter (``TRITON_INTERPRET=1``, set before the
kernels load), FlexAttention eagerly and forward only (PyTorch has no CPU backward for it), wall-clock
timings. It checks the script, not the hardware. Needs only PyTorch, Triton, NumPy, timm and the fibo
package (no Hydra, Lightning or MLflow), so it runs under a plain CUDA image's python3.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ["section", "pattern", "backend", "dtype", "N", "L", "B", "H", "d", "fwd_ms", "fb_ms", "fwd_ratio",
           "fb_ratio", "peak_mib", "first_call_s", "images_per_s", "max_rel_err", "ok", "note",
           "commit", "device", "torch", "triton"]
GPU_SIZES = (196, 784, 1568, 3136, 6272, 12544)
DRY_SIZES = (16, 33)
DEFAULT_BUDGETS = {"parity": 45.0, "kernels": 240.0, "vit": 75.0}
#: backends of a sparse pattern that the CUDA rule ranks (gpu_check's name -> attention.backend)
RULE_NAMES = {"triton": "triton", "flex": "flex", "sdpa_mask": "sdpa"}
PROVISIONAL_ORDER = ("triton", "flex", "sdpa")


# ------------------------------------------------------------------ budgets

@dataclass
class Budget:
    """Seconds per section; :meth:`over` says (once per item) whether a section's time is spent."""

    seconds: dict[str, float]
    clock: Callable[[], float] = time.perf_counter
    started: dict[str, float] = field(default_factory=dict)

    def start(self, section: str) -> None:
        self.started[section] = self.clock()

    def elapsed(self, section: str) -> float:
        return self.clock() - self.started[section]

    def over(self, section: str) -> str | None:
        """``None`` while ``section`` has time left, else the reason an item is skipped (one line)."""
        spent, limit = self.elapsed(section), self.seconds[section]
        return None if spent < limit else f"skipped: section {section} over its budget ({spent:.0f} s of {limit:.0f} s)"


def parse_budgets(text: str) -> dict[str, float]:
    """``"parity=45,kernels=240,vit=75"`` (any subset) -> the budgets with those replaced."""
    out = dict(DEFAULT_BUDGETS)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise argparse.ArgumentTypeError(f"unknown section {key!r} in --budgets; sections: {', '.join(out)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--budgets {key}={value!r} is not a number of seconds") from None
    return out


# ------------------------------------------------------------------ timing

class Timer:
    """Median milliseconds of ``fn`` after warm-up: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device, target_s: float, min_reps: int, max_reps: int) -> None:
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.target_s, self.min_reps, self.max_reps = target_s, min_reps, max_reps

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def wall(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def __call__(self, fn) -> tuple[float, float]:
        """``(median ms, first call s)``; the first call (compilation, caches) is not in the median."""
        first = self.wall(fn)
        est = min(self.wall(fn) for _ in range(2)) if self.cuda else first
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s / max(est, 1e-6))))
        if not self.cuda:
            return statistics.median(self.wall(fn) * 1e3 for _ in range(reps)), first
        torch = self.torch
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events), first

    def peak_mib(self, fn) -> float:
        """Peak memory (MiB) that one call of ``fn`` adds above what is live (nan on the CPU)."""
        if not self.cuda:
            return math.nan
        torch = self.torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------ environment

def environment(commit: str | None, device) -> dict[str, str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        triton_version = f"none ({type(err).__name__})"
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.strip()
            commit += "+dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (pass --commit)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, dry run)"
    return {"commit": commit, "device": name, "torch": torch.__version__, "triton": triton_version}


def row(**values) -> dict:
    out = {k: "" for k in COLUMNS}
    out.update(values)
    return out


# ------------------------------------------------------------------ 1. parity

def parity_cases(dry: bool) -> list[tuple]:
    """(pattern, options, N, H, depth, B, d, cls) per case."""
    if dry:
        return [("fibottention", {}, 17, 2, 1, 1, 16, True), ("fibottention", {"modified": True}, 10, 1, 0, 2, 16, False),
                ("sparse_transformer", {"stride": 3}, 12, 2, 0, 1, 16, True)]
    cases = []
    for cls in (True, False):
        cases += [("fibottention", {}, 196, 12, 1, 2, 64, cls), ("fibottention", {"modified": True}, 131, 3, 0, 1, 64, cls),
                  ("fibottention", {}, 196, 1, 2, 1, 32, cls), ("longformer", {}, 197, 2, 0, 2, 64, cls),
                  ("dilated", {}, 131, 2, 0, 1, 32, cls), ("sparse_transformer", {}, 196, 2, 0, 1, 64, cls)]
    return cases


def parity(device, dry: bool, budget: Budget, env: dict) -> list[dict]:
    import torch

    from fibo.attention import PATTERNS, Attention
    from fibo.attention.backends.sdpa import math_neg_inf
    from fibo.attention.backends.triton_offsets import OffsetPlan, offset_attention

    rows = []
    dtypes = (torch.float32, torch.bfloat16)
    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2}
    for name, opts, n, h, depth, b, d, cls in parity_cases(dry):
        layout = PATTERNS[name](**opts).layout(n, h, depth, cls)
        label = name + ("-modified" if opts.get("modified") else "") + ("" if cls else "-nocls")
        for dtype in dtypes:
            base = row(section="parity", pattern=label, backend="triton", dtype=str(dtype).removeprefix("torch."),
                       N=n, L=layout.seq_len, B=b, H=h, d=d, **env)
            reason = budget.over("parity")
            if reason:
                rows.append({**base, "ok": "skipped", "note": reason})
                continue
            g = torch.Generator().manual_seed(n * 31 + h)
            q, k, v = (torch.randn(b, h, layout.seq_len, d, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
            go = torch.randn(b, h, layout.seq_len, d, generator=g).to(device)
            try:
                out = offset_attention(q, k, v, OffsetPlan.from_layout(layout, device))
                grads = torch.autograd.grad(out, (q, k, v), go.to(dtype))
                ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
                ref = math_neg_inf(*ref_in, layout.mask().to(device))
                ref_grads = torch.autograd.grad(ref, ref_in, go.double())
                errs = [((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                        for a, r in zip((out, *grads), (ref, *ref_grads))]
                worst = max(errs)
                ok = worst < tol[dtype]
                note = "out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs) + f"; tolerance {tol[dtype]:.0e}"
            except Exception as err:  # noqa: BLE001 - a kernel that fails to build is a parity failure
                worst, ok, note = math.nan, False, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            rows.append({**base, "max_rel_err": worst, "ok": ok, "note": note})
            print(f"parity {label:28s} {base['dtype']:8s} N={n:4d} H={h:2d} B={b} d={d:2d}: "
                  f"{'OK' if ok else 'FAILED'} ({note})", flush=True)
    # the layer: auto's choice on this device, and its output against the sdpa backend
    reason = budget.over("parity")
    width, heads, n = (32, 2, 16) if dry else (768, 12, 196)
    base = row(section="parity", pattern="fibottention-layer", dtype="float32", N=n, L=n + 1, B=2, H=heads,
               d=width // heads, **env)
    if reason:
        return rows + [{**base, "backend": "auto" if device.type == "cuda" else "triton", "ok": "skipped", "note": reason}]
    torch.manual_seed(0)
    asked = "auto" if device.type == "cuda" else "triton"  # (auto on the CPU is the C++ kernel, not this check's)
    layer = Attention(width, num_heads=heads, attention={"name": "fibottention", "backend": asked}, layer_index=3).to(device)
    ref = Attention(width, num_heads=heads, attention={"name": "fibottention", "backend": "sdpa"}, layer_index=3).to(device)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, n + 1, width, device=device, requires_grad=True)
    chosen = layer.backend_for(n, x.device, x.dtype, True).name
    out, expected = layer(x), ref(x)
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    ok = err < 2e-4 and chosen == "triton"
    rows.append({**base, "backend": f"{asked}->{chosen}", "max_rel_err": err, "ok": ok,
                 "note": f"{asked} took {chosen} (expected triton); output vs backend=sdpa"})
    print(f"parity layer: {asked} -> {chosen}, rel err {err:.1e}: {'OK' if ok else 'FAILED'}", flush=True)
    return rows


# ------------------------------------------------------------------ 2. kernels

def kernel_rows(device, dry: bool, sizes, head_dims, budget: Budget, env: dict, timer: Timer) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from fibo.attention import PATTERNS
    from fibo.attention.backends.flex import block_mask, flex_attention
    from fibo.attention.backends.triton_offsets import OffsetPlan, offset_attention

    rows = []
    heads = 2 if dry else 12
    dtypes = (torch.bfloat16, torch.float32)
    max_mask_bytes = 2**24 if dry else 2**32
    work = [("fibottention", {}, d, dtype, n) for d in head_dims for dtype in dtypes for n in sizes]
    work += [("bigbird", {}, head_dims[0], dtype, n) for dtype in dtypes[:1 if dry else 2] for n in sizes]
    for pattern, opts, d, dtype, n in work:
        L, b = n + 1, max(1, (32 if dry else 1568) // n)
        dname = str(dtype).removeprefix("torch.")
        base = row(section="kernels", pattern=pattern, dtype=dname, N=n, L=L, B=b, H=heads, d=d, **env)
        offset = pattern != "bigbird"
        names = ["dense", "triton", "flex", "sdpa_mask"] if offset else ["dense", "flex", "sdpa_mask"]
        reason = budget.over("kernels")
        if reason:
            rows += [{**base, "backend": nm, "note": reason} for nm in names]
            continue
        layout = PATTERNS[pattern](**opts).layout(n, heads, 0, True)
        g = torch.Generator().manual_seed(n)
        qkv = torch.randn(b, L, 3, heads, d, generator=g).to(device, dtype).requires_grad_(True)
        go = torch.randn(b, heads, L, d, generator=g).to(device, dtype)

        def views(detach=False):
            return (qkv.detach() if detach else qkv).permute(2, 0, 3, 1, 4).unbind(0)

        fns, notes = {}, {}
        fns["dense"] = lambda: F.scaled_dot_product_attention(*views())
        if offset:
            plan = OffsetPlan.from_layout(layout, device)
            fns["triton"] = lambda plan=plan: offset_attention(*views(), plan)
        t = time.perf_counter()
        bm = block_mask(layout, device)
        notes["flex"] = f"block mask built in {(time.perf_counter() - t) * 1e3:.0f} ms"
        compiled = device.type == "cuda"
        # eager FlexAttention on the CPU refuses inputs that require grad even under no_grad
        fns["flex"] = lambda bm=bm: flex_attention(*views(detach=not compiled), bm, compile=compiled)
        if heads * L * L <= max_mask_bytes:
            mask = layout.mask().to(device)
            fns["sdpa_mask"] = lambda mask=mask: F.scaled_dot_product_attention(*views(), attn_mask=mask)
        else:
            notes["sdpa_mask"] = f"skipped: boolean mask of {heads * L * L / 2**30:.1f} GiB"
        res = {}
        for nm in names:
            if nm not in fns:
                res[nm] = {**base, "backend": nm, "note": notes.get(nm, "")}
                continue
            reason = budget.over("kernels")
            if reason:
                res[nm] = {**base, "backend": nm, "note": reason}
                continue
            f = fns[nm]
            r = {**base, "backend": nm, "note": notes.get(nm, "")}
            try:
                with torch.no_grad():
                    r["fwd_ms"], first_fwd = timer(f)

                def fb(f=f):
                    f().backward(go)
                    qkv.grad = None

                if nm == "flex" and not compiled:
                    r["note"] = "; ".join(filter(None, [r["note"], "fwd+bwd skipped: FlexAttention has no CPU backward"]))
                    first_fb = 0.0
                else:
                    r["fb_ms"], first_fb = timer(fb)
                    r["peak_mib"] = timer.peak_mib(fb)
                r["first_call_s"] = first_fwd + first_fb
            except Exception as err:  # noqa: BLE001 - one backend failing is a row, not the end of the check
                text = str(err).strip()
                r["note"] = f"failed: {type(err).__name__}: {text.splitlines()[-1][:160] if text else ''}"
            res[nm] = r
        dense = res["dense"]
        for r in res.values():
            for key in ("fwd", "fb"):
                if r.get(f"{key}_ms", "") != "" and dense.get(f"{key}_ms", "") != "":
                    r[f"{key}_ratio"] = r[f"{key}_ms"] / dense[f"{key}_ms"]
            rows.append(r)
            print(f"kernels {pattern:12s} {dname:8s} d={d:2d} N={n:5d} B={b:2d} {r['backend']:9s} "
                  f"fwd {_fmt(r['fwd_ms'], 3):>8s} ms ({_fmt(r['fwd_ratio'], 2)}x) fwd+bwd {_fmt(r['fb_ms'], 3):>8s} ms "
                  f"({_fmt(r['fb_ratio'], 2)}x) first {_fmt(r['first_call_s'], 1)} s {r['note']}", flush=True)
        del qkv, go, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ 3. ViT training

def vit_rows(device, dry: bool, with_flex: bool, budget: Budget, env: dict, timer: Timer) -> list[dict]:
    import torch
    import torch.nn.functional as F

    try:
        from fibo.models.vit import VisionTransformer
    except Exception as err:  # noqa: BLE001 - e.g. another timm on a plain CUDA image: a row, not the end
        print(f"vit: skipped: fibo.models.vit does not import ({type(err).__name__}: {err})", flush=True)
        return [row(section="vit", pattern="vit", backend="", note=f"skipped: fibo.models.vit does not import "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", **env)]

    if dry:
        arch = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        batch, steps, label = 2, 1, "vit_dry_2x32px"
    else:
        arch = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
        batch, steps, label = 64, 10, "vit_base_patch16_224"
    n = (arch["img_size"] // arch["patch_size"]) ** 2
    # on the CPU, auto is the C++ kernel (fibo-bench's subject): the dry run takes triton in its place
    variants = [("dense", {"name": "dense"}), ("fibottention", {"name": "fibottention", "backend": "triton" if dry else "auto"}),
                ("fibottention", {"name": "fibottention", "backend": "sdpa"})]
    if with_flex:
        variants.append(("fibottention", {"name": "fibottention", "backend": "flex"}))
    autocast = device.type == "cuda"
    dtype = "bf16-autocast" if autocast else "float32"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, arch["img_size"], arch["img_size"], generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    models, steps_fn, meta = {}, {}, {}
    for attn_name, attn in variants:
        key = f"{attn_name}/{attn.get('backend', 'sdpa')}"
        base = row(section="vit", pattern=f"{label}:{attn_name}", dtype=dtype, N=n, L=n + 1, B=batch,
                   H=arch["num_heads"], d=arch["embed_dim"] // arch["num_heads"], **env)
        torch.manual_seed(0)
        model = VisionTransformer(num_classes=100, attention=attn, **arch).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        used = model.blocks[0].attn.backend_for(n, device, torch.bfloat16 if autocast else torch.float32, True).name
        meta[key] = {**base, "backend": f"{attn.get('backend', 'sdpa')}->{used}"}

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        models[key], steps_fn[key] = model, step
    rows, times = [], {k: [] for k in steps_fn}
    for key, fn in steps_fn.items():  # warm-up (compilation, cuDNN/cuBLAS choices, allocator)
        reason = budget.over("vit")
        if reason:
            meta[key]["note"] = reason
            continue
        try:
            meta[key]["first_call_s"] = timer.wall(fn)
            if not dry:
                timer.wall(fn)
        except Exception as err:  # noqa: BLE001
            text = str(err).strip()
            meta[key]["note"] = f"failed: {type(err).__name__}: {text.splitlines()[-1][:160] if text else ''}"
    live = [k for k in steps_fn if meta[k]["first_call_s"] != "" and not meta[k]["note"]]
    for _ in range(steps):
        if budget.over("vit"):
            break
        for key in live:
            times[key].append(timer.wall(steps_fn[key]))
    dense_ips = None
    for key in steps_fn:
        r = meta[key]
        if times[key]:
            ms = statistics.median(times[key]) * 1e3
            r.update(fb_ms=ms, images_per_s=batch / (ms / 1e3))
            r["note"] = r["note"] or f"median of {len(times[key])} steps (forward, backward, AdamW), round-robin"
            dense_ips = dense_ips or (r["images_per_s"] if key.startswith("dense") else None)
            if dense_ips:
                r["fb_ratio"] = dense_ips / r["images_per_s"]  # time ratio to dense, as the kernel rows
        elif not r["note"]:
            r["note"] = budget.over("vit") or "no step measured"
        rows.append(r)
        print(f"vit {r['pattern']:36s} {r['backend']:16s} step {_fmt(r['fb_ms'], 1):>8s} ms "
              f"{_fmt(r['images_per_s'], 1):>8s} images/s {r['note']}", flush=True)
    return rows


# ------------------------------------------------------------------ the measured auto rule

def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def measured_rule(rows: list[dict]) -> dict:
    """The ``CUDA_AUTO_RULE`` the kernel rows support: per (kind, dtype, head dim), steps
    ``(from N, backends by forward+backward time)``, a step wherever the ranking changes; backends
    without a time at an N (skipped, failed) follow in the provisional order. ``("offset"|"mask",
    "*", "*")`` copies the bf16 entry of the first head dim measured."""
    table: dict[tuple, dict[int, list[tuple[float, str]]]] = {}
    for r in rows:
        if r["section"] != "kernels" or r["backend"] not in RULE_NAMES:
            continue
        kind = "mask" if r["pattern"] == "bigbird" else "offset"
        table.setdefault((kind, r["dtype"], int(r["d"])), {}).setdefault(int(r["N"]), []).append((_num(r["fb_ms"]), RULE_NAMES[r["backend"]]))
    rule: dict = {}
    for key, per_n in table.items():
        steps = []
        for n in sorted(per_n):
            timed = sorted((t, nm) for t, nm in per_n[n] if not math.isnan(t))
            if not timed:
                continue
            ranking = tuple(nm for _, nm in timed)
            ranking += tuple(nm for nm in PROVISIONAL_ORDER if nm not in ranking and (key[0] == "offset" or nm != "triton"))
            if not steps or steps[-1][1] != ranking:
                steps.append((1 if not steps else n, ranking))
        if steps:
            rule[key] = tuple(steps)
    for kind in ("offset", "mask"):
        keys = [k for k in rule if k[0] == kind]
        bf16 = [k for k in keys if k[1] == "bfloat16"] or keys
        if bf16:
            rule[(kind, "*", "*")] = rule[bf16[0]]
    return rule


def rule_text(rule: dict, env: dict) -> str:
    if not rule:
        return "# no kernel timings: no measured rule"
    lines = ["CUDA_AUTO_RULE: dict[tuple[str, str, int | str], tuple[tuple[int, tuple[str, ...]], ...]] = {"]
    for key in sorted(rule, key=lambda k: (k[0], k[1] == "*", str(k[1]), k[2] == "*", str(k[2]))):
        lines.append(f"    {key!r}: {rule[key]!r},")
    lines.append("}")
    lines.append(f"CUDA_AUTO_RULE_SOURCE = {('measured by scripts/gpu_check.py at ' + env['commit'] + ' on ' + env['device'] + ', torch ' + env['torch'] + ', triton ' + env['triton'])!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------ output

def _fmt(x, nd=2) -> str:
    x = _num(x)
    return "" if math.isnan(x) else f"{x:.{nd}f}"


def targets(rows: list[dict]) -> list[str]:
    """The issue's GPU targets, read off the rows (bf16, d=64, Fibottention)."""
    out = []
    tri = {int(r["N"]): _num(r["fb_ratio"]) for r in rows if r["section"] == "kernels" and r["backend"] == "triton"
           and r["dtype"] == "bfloat16" and r["pattern"] == "fibottention" and str(r["d"]) == "64"}
    for n, ratio in sorted(tri.items()):
        want = 1.0 if n < 3136 else 0.3
        verdict = "not measured" if math.isnan(ratio) else ("met" if ratio <= want else "NOT met")
        out.append(f"Triton fwd+bwd at N={n}: {_fmt(ratio)}x FlashAttention (target <= {want}x): {verdict}")
    vit = [r for r in rows if r["section"] == "vit"]
    dense = next((_num(r["images_per_s"]) for r in vit if r["pattern"].endswith(":dense")), math.nan)
    auto = next((_num(r["images_per_s"]) for r in vit if r["backend"].startswith("auto")), math.nan)
    if not math.isnan(dense) and not math.isnan(auto):
        out.append(f"ViT training, Fibottention (auto) {auto:.1f} vs dense {dense:.1f} images/s (target >= dense): "
                   f"{'met' if auto >= dense else 'NOT met'}")
    return out


def _md_table(rows: list[dict], section: str, header: str, row: Callable[[dict], str]) -> list[str]:
    """A markdown table of the ``section`` rows: ``header``, its alignment line (text columns left,
    numbers right: those named ms, ratio, MiB, s, err, images/s, N, H, B, d, L, batch), one line per row."""
    names = [c.strip() for c in header.strip("|").split("|")]
    numeric = ("ms", "ratio", "MiB", "s", "err", "images/s", "dense")
    align = ["---:" if n in ("N", "H", "B", "d", "L", "batch") or n.split()[-1] in numeric else "---" for n in names]
    return [header, "|" + "|".join(align) + "|", *(row(r) for r in rows if r["section"] == section)]


def markdown(rows: list[dict], env: dict, rule: dict, failures: list[str], dry: bool, wall_s: float) -> str:
    lines = [f"# GPU benchmark of fibo's sparse attention{' (DRY RUN on the CPU: checks the script, not a GPU)' if dry else ''}", "",
             f"`python3 scripts/gpu_check.py{' --dry-run' if dry else ''}` at commit {env['commit']}, on {env['device']}, "
             f"torch {env['torch']}, triton {env['triton']}; {wall_s:.0f} s wall. Times: median ms after warm-up "
             "(CUDA events on a GPU); ratio = time / dense SDPA time in the same run; first call = compilation "
             "and first run (s, not in the median); peak = memory one forward+backward adds (MiB).", "",
             "## Parity (Triton kernel vs float64 dense-mask math, forward and gradients)", "",
             f"{'All cases agree.' if not failures else 'FAILED: ' + '; '.join(failures)}", "",
             *_md_table(rows, "parity", "| pattern | dtype | N | H | B | d | max rel err | ok | note |",
                        lambda r: f"| {r['pattern']} ({r['backend']}) | {r['dtype']} | {r['N']} | {r['H']} | {r['B']} | "
                                  f"{r['d']} | {_fmt(r['max_rel_err'], 7)} | {r['ok']} | {r['note']} |"),
             "", "## Attention kernels (fwd; fwd+bwd)", "",
             *_md_table(rows, "kernels", "| pattern | dtype | d | N | L | B | backend | fwd ms | fwd ratio | fwd+bwd ms | "
                                         "fwd+bwd ratio | peak MiB | first call s | note |",
                        lambda r: f"| {r['pattern']} | {r['dtype']} | {r['d']} | {r['N']} | {r['L']} | {r['B']} | "
                                  f"{r['backend']} | {_fmt(r['fwd_ms'], 3)} | {_fmt(r['fwd_ratio'])} | {_fmt(r['fb_ms'], 3)} | "
                                  f"{_fmt(r['fb_ratio'])} | {_fmt(r['peak_mib'], 1)} | {_fmt(r['first_call_s'], 1)} | {r['note']} |"),
             "", "## ViT training throughput", "",
             *_md_table(rows, "vit", "| model:attention | backend (asked->used) | dtype | batch | step ms | images/s | "
                                     "time / dense | first step s | note |",
                        lambda r: f"| {r['pattern']} | {r['backend']} | {r['dtype']} | {r['B']} | {_fmt(r['fb_ms'], 1)} | "
                                  f"{_fmt(r['images_per_s'], 1)} | {_fmt(r['fb_ratio'])} | {_fmt(r['first_call_s'], 1)} | "
                                  f"{r['note']} |")]
    lines += ["", "## Targets (issue #12)", ""] + [f"- {t}" for t in targets(rows) or ["nothing measured"]]
    lines += ["", "## The measured `auto` rule", "",
              "Backends ranked by forward+backward time per N (patch tokens), dtype and head dim; paste over "
              "`CUDA_AUTO_RULE` / `CUDA_AUTO_RULE_SOURCE` in `fibo/attention/backends/__init__.py`"
              + (" (a dry run's rule is CPU timings: do not paste it)" if dry else "") + ":", "", "```python",
              rule_text(rule, env), "```", ""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ------------------------------------------------------------------ main

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 196,3136")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU, tiny shapes, Triton's interpreter")
    p.add_argument("--out-dir", type=Path, default=ROOT / "experiments", help="where gpu_benchmark.{csv,md} go")
    p.add_argument("--sizes", type=_ints, default=None, help=f"patch tokens N (default {','.join(map(str, GPU_SIZES))})")
    p.add_argument("--head-dims", type=_ints, default=None, help="head dims, the first one also for BigBird (default 64,32)")
    p.add_argument("--budgets", type=parse_budgets, default=dict(DEFAULT_BUDGETS),
                   help="seconds per section, e.g. parity=45,kernels=240,vit=75")
    p.add_argument("--sections", default="parity,kernels,vit", help="which sections to run (comma-separated)")
    p.add_argument("--vit-flex", action="store_true", help="also time the ViT with FlexAttention (compiles 12 layers)")
    p.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse, where .git is there)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before fibo loads the kernels: they run in the interpreter
    sys.path.insert(0, str(ROOT))
    import torch

    start = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the script on the CPU)")
        return 2
    else:
        device = torch.device("cuda")
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):  # one compiled flex per (N, dtype, pattern): no eager fallback
                setattr(torch._dynamo.config, name, 256)
    sizes = args.sizes or (DRY_SIZES if args.dry_run else GPU_SIZES)
    head_dims = args.head_dims or ((16,) if args.dry_run else (64, 32))
    sections = set(filter(None, args.sections.split(",")))
    unknown = sections - set(DEFAULT_BUDGETS)
    if unknown:
        print(f"gpu_check: error: unknown --sections {sorted(unknown)}; sections: {', '.join(DEFAULT_BUDGETS)}")
        return 2
    env = environment(args.commit, device)
    print(f"gpu_check: {env}; budgets {args.budgets}", flush=True)
    budget = Budget(args.budgets)
    timer = Timer(device, target_s=0.05 if args.dry_run else 0.3, min_reps=1 if args.dry_run else 5,
                  max_reps=2 if args.dry_run else 100)
    rows: list[dict] = []
    for section in ("parity", "kernels", "vit"):
        if section not in sections:
            continue
        budget.start(section)
        if section == "parity":
            rows += parity(device, args.dry_run, budget, env)
        elif section == "kernels":
            rows += kernel_rows(device, args.dry_run, sizes, head_dims, budget, env, timer)
        else:
            rows += vit_rows(device, args.dry_run, args.vit_flex, budget, env, timer)
        print(f"gpu_check: section {section} took {budget.elapsed(section):.0f} s (budget {args.budgets[section]:.0f} s)", flush=True)
    failures = [f"{r['pattern']} {r['dtype']} N={r['N']} d={r['d']}: {r['note']}" for r in rows
                if r["section"] == "parity" and r["ok"] is False]
    rule = measured_rule(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "gpu_benchmark.csv", rows)
    wall = time.perf_counter() - start
    (args.out_dir / "gpu_benchmark.md").write_text(markdown(rows, env, rule, failures, args.dry_run, wall))
    print("\nThe measured auto rule (paste into fibo/attention/backends/__init__.py):\n" + rule_text(rule, env))
    for t in targets(rows):
        print("target: " + t)
    print(f"gpu_check: parity {'OK' if not failures else 'FAILED (' + str(len(failures)) + ')'}; wrote "
          f"{args.out_dir / 'gpu_benchmark.csv'} and .md in {wall:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
