"""fibo-bench writes a CSV and a markdown table with a row per (N, backend) and real numbers."""

import csv

from fibo import bench


def test_bench_small_run_writes_csv_and_markdown(tmp_path):
    assert bench.main(["--sizes", "40,70", "--heads", "2", "--head-dim", "8", "--budget", "0.2", "--no-e2e",
                       "--out", str(tmp_path), "--stem", "b"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [(r["N"], r["backend"]) for r in rows] == [(n, b) for n in ("40", "70") for b in ("dense", "sdpa_mask", "sparse")]
    for r in rows:
        assert float(r["fwd_ms"]) > 0 and float(r["fb_ms"]) > 0
        if r["backend"] == "dense":
            assert float(r["fwd_ratio"]) == 1.0 and float(r["density"]) == 1.0
        else:
            assert 0 < float(r["density"]) < 1 and float(r["build_mib"]) > 0
    md = (tmp_path / "b.md").read_text()
    assert "| 70 | 22 | sparse |" in md and "(skipped: --no-e2e)" in md


def test_train_throughput_rows(monkeypatch):
    monkeypatch.setitem(bench.E2E_MODELS, "tiny_video", ("timesformer_nano", dict(img_size=16, patch_size=4, num_frames=2,
                                                                                   attention_type="joint"), (3, 2, 16, 16), 32))
    rows = bench.train_throughput("tiny_video", batch=2, steps=2, device=bench.torch.device("cpu"), budget_s=1.0)
    assert [(r["model"], r["attention"], r["backend"]) for r in rows] == [
        ("tiny_video", "dense", "sdpa"), ("tiny_video", "fibottention", "sparse"), ("tiny_video", "free", "free")]
    assert rows[0]["ratio_to_dense"] == 1.0 and rows[0]["density"] == 1.0
    assert 0 < rows[1]["density"] < 1 and rows[1]["images_per_s"] > 0 and rows[1]["steps"] == 2
    # the Amdahl limit is the free model's speed-up, the same on every row
    assert rows[2]["ratio_to_dense"] == rows[0]["amdahl_limit"] == rows[1]["amdahl_limit"] > 0
    assert rows[1]["share_of_limit"] == rows[1]["ratio_to_dense"] / rows[1]["amdahl_limit"]


def test_free_attention_costs_nothing_and_keeps_the_linears_trained():
    """The Amdahl stand-in: attention output = v, so q and k get no gradient but qkv/proj do."""
    from fibo.attention import Attention

    layer = Attention(16, num_heads=2, attention={"name": "dense"})
    bench._make_free(layer)
    x = bench.torch.randn(2, 5, 16, requires_grad=True)
    out = layer(x)
    v = layer.qkv(x).reshape(2, 5, 3, 2, 8)[:, :, 2].reshape(2, 5, 16)
    bench.torch.testing.assert_close(out, layer.proj(v))
    out.sum().backward()
    assert layer.qkv.weight.grad[:32].abs().max() == 0 and layer.qkv.weight.grad[32:].abs().max() > 0


def test_pass_bytes_and_limit_columns(tmp_path):
    # B=2, H=3, L=11, d=4, fp32: one tensor 1056 bytes, lse 264
    assert bench.pass_bytes(2, 3, 11, 4) == {"fwd": 4 * 1056 + 264, "bwd": 8 * 1056 + 264}
    assert bench.stream_bandwidth(bench.torch.device("cpu"), mib=8, reps=2) > 0.1  # GB/s
    rows = bench.attention_rows(10, 3, 4, 2, ["dense", "sparse"], bench.torch.device("cpu"), 0.05,
                                {"name": "fibottention", "modified": False}, min_reps=2, bandwidth_gbs=2.0)
    for r in rows:
        assert r["bytes_fwd"] == 4 * 1056 + 264 and r["limit_fwd_ms"] == (4 * 1056 + 264) / 2e9 * 1e3
        assert r["bwd_ms"] == r["fb_ms"] - r["fwd_ms"]
    md = "\n".join(bench.traffic_lines(rows))
    assert "| 10 | 2 | sparse | 0.00 | 0.01 | 2.0 | 0.002 |" in md


def test_peak_memory_counts_what_the_call_allocates():
    """The CPU peak is the RSS high-water mark above the start (the row's >= 0 check could not fail)."""
    cpu = bench.torch.device("cpu")
    big = bench.measure_peak_mib(lambda: bench.torch.ones(96 * 2**20 // 4).sum(), cpu)  # touches 96 MiB
    small = bench.measure_peak_mib(lambda: bench.torch.ones(16).sum(), cpu)
    assert 80 < big < 200 and small < 20


def test_recorded_markdown_is_what_fibo_bench_renders_from_its_csv():
    """experiments/sparse_attention_benchmark.md had hand-edited lines (an old end-to-end table and a
    stale 'not measured yet'); its generated part must be markdown(read_csv(its CSV))."""
    from pathlib import Path
    from types import SimpleNamespace

    recorded = Path(__file__).resolve().parents[1] / "experiments" / "sparse_attention_benchmark"
    md = recorded.with_suffix(".md").read_text()
    rows, e2e = bench.read_csv(recorded.with_suffix(".csv"))
    env = {"command": "", "machine": "", "threads": 2, "device": "cpu", "date": ""}  # the header is not compared
    rendered = bench.markdown(rows, e2e, SimpleNamespace(heads=12, head_dim=64, pattern="fibottention"), env)
    generated = md.split("\n## Notes (written by hand, not by fibo-bench)", 1)[0]
    assert generated.split("Targets:", 1)[1] == rendered.split("Targets:", 1)[1]
    assert len(rows) == 18 and len(e2e) == 9
