"""GPU check for fibo's sparse attention (run on a CUDA machine; under 5 minutes on one GPU).

    python scripts/gpu_check.py            # parity + timing, prints a table, exit code 1 on a parity failure
    python scripts/gpu_check.py --quick    # N in (196, 3136) only

1. Parity on the GPU: FlexAttention (compiled, block mask with the per-head ``[h, |q - kv|]``
   lookup) against SDPA with the dense boolean mask, forward and gradients (fp32, tolerance 2e-4
   relative to the largest entry), on every golden pattern (N=196, H=3/6/12, plain and modified) with
   and without CLS, plus N=131 (not a multiple of the 128 block), B=1, H=1; and the layer's
   ``backend: auto`` choice.
2. Timing (median of CUDA-event-free wall time after synchronisation, ms) of forward and
   forward+backward at H=12, d=64, fp32 and bf16 for N in 196 ... 12544: dense SDPA (no mask),
   SDPA with the boolean mask, FlexAttention; ratios to dense; peak memory (MiB); block-mask build time.

Writes ``experiments/gpu_check.md`` (the table) next to the CPU benchmark. Uses only the fibo package
and PyTorch (>= 2.5 for FlexAttention).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fibo.attention import Attention, AttentionSpec  # noqa: E402
from fibo.attention.backends import resolve_backend  # noqa: E402
from fibo.attention.backends.flex import block_mask, flex_attention  # noqa: E402


def parity(device) -> list[str]:
    failures = []
    golden = json.loads((ROOT / "tests" / "golden" / "fibottention_offsets.json").read_text())["cases"]
    cases = [(c["num_patch_tokens"], c["num_heads"], c["modified"], 2) for c in golden] + [(131, 1, True, 1), (131, 1, False, 1)]
    for n, h, modified, batch in cases:
        for cls in (True, False):
            opts = {"modified": modified}
            layout = AttentionSpec.parse({"name": "fibottention", **opts}).pattern.layout(n, h, 1, cls)
            mask = layout.mask().to(device)
            bm = block_mask(layout, device)
            g = torch.Generator(device="cpu").manual_seed(n + h)
            q, k, v = (torch.randn(batch, h, n + cls, 64, generator=g).to(device).requires_grad_(True) for _ in range(3))
            out = flex_attention(q, k, v, bm)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            go = torch.randn_like(ref)
            grads = torch.autograd.grad(out, (q, k, v), go)
            ref_grads = torch.autograd.grad(ref, (q, k, v), go)
            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
                if not err < 2e-4:
                    failures.append(f"N={n} H={h} modified={modified} cls={cls} {name}: rel err {err:.2e}")
    chosen = resolve_backend("auto", device=torch.device(device), num_tokens=3136, dtype=torch.float32)
    if chosen != "flex":
        failures.append(f"auto picked {chosen} at N=3136 on {device}")
    layer = Attention(768, num_heads=12, attention={"name": "fibottention", "backend": "flex"}).to(device)
    ref_layer = Attention(768, num_heads=12, attention={"name": "fibottention", "backend": "sdpa"}).to(device)
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 197, 768, device=device)
    err = (layer(x) - ref_layer(x)).abs().max().item()
    if not err < 1e-4:
        failures.append(f"layer flex vs sdpa: max abs err {err:.2e}")
    return failures


def bench(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def timing(device, sizes, dtypes) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for n in sizes:
            L, h, d, b = n + 1, 12, 64, max(1, 3136 // n)
            q, k, v = (torch.randn(b, h, L, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            go = torch.randn(b, h, L, d, device=device, dtype=dtype)
            t = time.perf_counter()
            layout = AttentionSpec.parse({"name": "fibottention"}).pattern.layout(n, h, 0, True)
            bm = block_mask(layout, device)
            torch.cuda.synchronize()
            build_ms = (time.perf_counter() - t) * 1e3
            fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
            if h * L * L <= 2**31:
                mask = layout.mask().to(device)
                fns["sdpa_mask"] = lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            fns["flex"] = lambda: flex_attention(q, k, v, bm)
            reps = 20 if n <= 3136 else 5
            res = {}
            for name, f in fns.items():
                def fb(f=f):
                    f().backward(go)
                    q.grad = k.grad = v.grad = None
                with torch.no_grad():
                    fwd = bench(f, reps)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fbt = bench(fb, reps)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                res[name] = (fwd, fbt, peak)
            for name, (fwd, fbt, peak) in res.items():
                rows.append({"dtype": str(dtype).split(".")[-1], "N": n, "B": b, "backend": name, "fwd_ms": fwd,
                             "fwd_ratio": fwd / res["dense"][0], "fb_ms": fbt, "fb_ratio": fbt / res["dense"][1],
                             "peak_mib": peak, "build_ms": build_ms if name == "flex" else 0.0})
                r = rows[-1]
                print(f"{r['dtype']:8s} N={n:6d} {name:10s} fwd {fwd:8.3f} ms ({r['fwd_ratio']:.3f}x) "
                      f"fwd+bwd {fbt:8.3f} ms ({r['fb_ratio']:.3f}x) peak {peak:8.1f} MiB", flush=True)
            del q, k, v, go, bm
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device")
        return 2
    device = "cuda"
    start = time.perf_counter()
    failures = parity(device)
    print(f"parity: {'OK' if not failures else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
    for f in failures:
        print("  " + f)
    sizes = (196, 3136) if args.quick else (196, 784, 1568, 3136, 6272, 12544)
    rows = timing(device, sizes, (torch.float32, torch.bfloat16))
    lines = [f"# GPU check ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
             f"Parity (flex vs dense-mask SDPA, fwd + grads): {'OK' if not failures else 'FAILED: ' + '; '.join(failures)}", "",
             "| dtype | N | B | backend | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | peak MiB | block-mask build ms |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['N']} | {r['B']} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_ratio']:.3f} | "
              f"{r['fb_ms']:.3f} | {r['fb_ratio']:.3f} | {r['peak_mib']:.1f} | {r['build_ms']:.1f} |" for r in rows]
    out = ROOT / "experiments" / "gpu_check.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
