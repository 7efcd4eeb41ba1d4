"""scripts/gpu_check.py: its --dry-run end to end on the CPU (Triton's interpreter, tiny shapes), and
the parts that decide things: the measured auto rule from timings, the per-section budgets."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fibo.attention import backends
from fibo.attention.backends import AttentionCall

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(gpu_check)


def krow(pattern, backend, dtype, n, fb, d=64):
    return gpu_check.row(section="kernels", pattern=pattern, backend=backend, dtype=dtype, N=n, d=d, fb_ms=fb)


def test_measured_rule_ranks_by_fwd_bwd_and_steps_where_it_changes():
    rows = [krow("fibottention", "dense", "bfloat16", 196, 0.1),  # dense is the baseline, never ranked
            krow("fibottention", "triton", "bfloat16", 196, 0.30), krow("fibottention", "sdpa_mask", "bfloat16", 196, 0.20),
            krow("fibottention", "flex", "bfloat16", 196, 0.50),
            krow("fibottention", "triton", "bfloat16", 784, 0.40), krow("fibottention", "sdpa_mask", "bfloat16", 784, 0.90),
            krow("fibottention", "flex", "bfloat16", 784, ""),   # skipped: follows in the provisional order
            krow("fibottention", "triton", "bfloat16", 3136, 1.0), krow("fibottention", "sdpa_mask", "bfloat16", 3136, 9.0),
            krow("fibottention", "flex", "bfloat16", 3136, 2.0),
            krow("fibottention", "triton", "float32", 196, 0.5), krow("fibottention", "sdpa_mask", "float32", 196, 0.6),
            krow("bigbird", "flex", "bfloat16", 196, 0.7), krow("bigbird", "sdpa_mask", "bfloat16", 196, 0.6),
            krow("bigbird", "flex", "bfloat16", 3136, 1.0), krow("bigbird", "sdpa_mask", "bfloat16", 3136, 5.0)]
    rule = gpu_check.measured_rule(rows)
    assert rule[("offset", "bfloat16", 64)] == ((1, ("sdpa", "triton", "flex")), (784, ("triton", "sdpa", "flex")),
                                              (3136, ("triton", "flex", "sdpa")))
    assert rule[("offset", "float32", 64)] == ((1, ("triton", "sdpa", "flex")),)
    assert rule[("offset", "*", "*")] == rule[("offset", "bfloat16", 64)]
    assert rule[("mask", "*", "*")] == rule[("mask", "bfloat16", 64)] == ((1, ("sdpa", "flex")), (3136, ("flex", "sdpa")))
    # the printed text is the table's Python, and the backends package reads it
    env = {"commit": "abc1234", "device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"}
    ns: dict = {}
    exec(gpu_check.rule_text(rule, env), ns)
    assert ns["CUDA_AUTO_RULE"] == rule
    assert ns["CUDA_AUTO_RULE_SOURCE"] == "measured by scripts/gpu_check.py at abc1234 on NVIDIA H200, torch 2.11.0, triton 3.6.0"
    call = AttentionCall(torch.device("cuda"), torch.bfloat16, 196, offset_pattern=True, head_dim=64)
    assert backends.cuda_ranking(call, rule) == ("sdpa", "triton", "flex")
    assert backends.cuda_ranking(AttentionCall(torch.device("cuda"), torch.bfloat16, 1000, offset_pattern=True, head_dim=64), rule)[0] == "triton"


def test_budget_skips_with_the_reason():
    now = [0.0]
    budget = gpu_check.Budget({"kernels": 10.0}, clock=lambda: now[0])
    budget.start("kernels")
    now[0] = 9.9
    assert budget.over("kernels") is None
    now[0] = 12.4
    assert budget.over("kernels") == "skipped: section kernels over its budget (12 s of 10 s)"
    assert gpu_check.parse_budgets("vit=5")["vit"] == 5.0
    with pytest.raises(Exception, match="unknown section 'gpu' in --budgets; sections: parity, kernels, vit"):
        gpu_check.parse_budgets("gpu=3")


def test_dry_run_writes_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out-dir", str(tmp_path),
                           "--commit", "test"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (tmp_path / "gpu_benchmark.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == gpu_check.COLUMNS
        rows = list(reader)
    assert {r["commit"] for r in rows} == {"test"} and all(r["torch"] == torch.__version__ for r in rows)
    parity = [r for r in rows if r["section"] == "parity"]
    assert len(parity) == 3 * 2 + 1 and all(r["ok"] == "True" for r in parity)
    assert all(float(r["max_rel_err"]) < (2e-4 if r["dtype"] == "float32" else 3e-2) for r in parity)
    kernels = {(r["pattern"], r["dtype"], int(r["N"]), r["backend"]): r for r in rows if r["section"] == "kernels"}
    want = {("fibottention", dt, n, b) for dt in ("bfloat16", "float32") for n in (16, 33)
            for b in ("dense", "triton", "flex", "sdpa_mask")}
    want |= {("bigbird", "bfloat16", n, b) for n in (16, 33) for b in ("dense", "flex", "sdpa_mask")}
    assert set(kernels) == want
    for key, r in kernels.items():
        assert float(r["fwd_ms"]) > 0, key
        if key[3] == "flex":
            assert r["fb_ms"] == "" and "FlexAttention has no CPU backward" in r["note"]
        else:
            assert float(r["fb_ms"]) > 0 and float(r["fb_ratio"]) > 0, key
    vit = [r for r in rows if r["section"] == "vit"]
    assert [(r["pattern"], r["backend"]) for r in vit] == [("vit_dry_2x32px:dense", "sdpa->sdpa"),
                                                          ("vit_dry_2x32px:fibottention", "triton->triton"),
                                                          ("vit_dry_2x32px:fibottention", "sdpa->sdpa")]
    assert all(float(r["images_per_s"]) > 0 for r in vit)
    md = (tmp_path / "gpu_benchmark.md").read_text()
    assert "DRY RUN" in md and "CUDA_AUTO_RULE: dict" in md and "## ViT training throughput" in md
    assert "CUDA_AUTO_RULE_SOURCE = 'measured by scripts/gpu_check.py at test on cpu" in proc.stdout
