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
    assert [(r["model"], r["attention"]) for r in rows] == [("tiny_video", "dense"), ("tiny_video", "fibottention")]
    assert rows[0]["ratio_to_dense"] == 1.0 and rows[0]["density"] == 1.0
    assert 0 < rows[1]["density"] < 1 and rows[1]["images_per_s"] > 0 and rows[1]["steps"] == 2


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
    assert len(rows) == 18 and len(e2e) == 2
