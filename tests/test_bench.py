"""fibo-bench writes a CSV and a markdown table with a row per (N, backend) and real numbers."""

import csv

from fibo import bench


def test_bench_small_run_writes_csv_and_markdown(tmp_path):
    assert bench.main(["--sizes", "40,70", "--heads", "2", "--head-dim", "8", "--budget", "0.2", "--no-e2e",
                       "--out", str(tmp_path), "--stem", "b"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [(r["N"], r["backend"]) for r in rows] == [(n, b) for n in ("40", "70") for b in ("dense", "sdpa_mask", "sparse")]
    for r in rows:
        assert float(r["fwd_ms"]) > 0 and float(r["fb_ms"]) > 0 and float(r["peak_mib"]) >= 0
        if r["backend"] == "dense":
            assert float(r["fwd_ratio"]) == 1.0 and float(r["density"]) == 1.0
        else:
            assert 0 < float(r["density"]) < 1 and float(r["build_mib"]) > 0
    md = (tmp_path / "b.md").read_text()
    assert "| 70 | 22 | sparse |" in md and "TimeSformer" in md
