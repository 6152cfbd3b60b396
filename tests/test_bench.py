"""scripts/bench_float8.py runs end to end on CPU in its --smoke mode (functional only: no timings are checked)."""

import json
import os
import subprocess
import sys

import pytest


def run_bench(repo_root, tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(repo_root, "scripts", "bench_float8.py"), *args, "--smoke",
                           "--no_profile", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("loss", ["fused", "eager"])
def test_e2e_smoke_runs_every_variant_with_the_chosen_loss(repo_root, tmp_path, loss):
    result = run_bench(repo_root, tmp_path, "e2e", "--variants", "bf16,tensorwise,delayed", "--loss", loss)
    e2e = result["e2e"]
    assert e2e["loss"] == loss
    for name in ("bf16", "tensorwise", "delayed"):
        assert e2e["variants"][name]["ms"] > 0, e2e["variants"][name]
    assert "speedup" in e2e["variants"]["tensorwise"] and "memory_vs_bf16" in e2e["variants"]["delayed"]


def test_e2e_rounds_keep_every_measurement_and_report_the_median(repo_root, tmp_path):
    result = run_bench(repo_root, tmp_path, "e2e", "--variants", "bf16,tensorwise", "--rounds", "3")
    for name in ("bf16", "tensorwise"):
        v = result["e2e"]["variants"][name]
        assert len(v["ms_rounds"]) == 3 and v["ms"] == sorted(v["ms_rounds"])[1]
    tw = result["e2e"]["variants"]["tensorwise"]
    assert len(tw["speedup_rounds"]) == 3


def test_linear_smoke_runs_rounds_and_reports_the_median(repo_root, tmp_path):
    result = run_bench(repo_root, tmp_path, "linear", "--variants", "bf16,tensorwise", "--rounds", "2")
    assert result["mode"] == "linear" and len(result["linear"]) == 5  # the five shapes, scaled down
    for shape in result["linear"].values():
        for name in ("bf16", "tensorwise"):
            v = shape[name]
            assert len(v["ms_rounds"]) == 2 and v["ms"] == sum(v["ms_rounds"]) / 2 > 0  # median of two
        assert shape["tensorwise"]["speedup"] == shape["bf16"]["ms"] / shape["tensorwise"]["ms"]
        assert len(shape["tensorwise"]["sqnr"].split("/")) == 3  # output / grad_input / grad_weight vs bf16, dB


def test_stream_idle_counts_only_time_with_nothing_running(repo_root, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_float8", os.path.join(repo_root, "scripts", "bench_float8.py"))
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_float8", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)

    def kernel(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        kernel("gemm", 0.0, 100.0),
        kernel("cast_on_side_stream", 50.0, 80.0),  # overlaps gemm and ends at 130: no gap before 130
        kernel("Memset (Device)", 133.0, 2.0, cat="gpu_memset"),  # 3 us gap
        kernel("norm", 160.0, 40.0),  # 25 us gap after the memset
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 135.0, "dur": 30.0},  # host side: not GPU work
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 300.0},  # not a duration event
    ]
    idle = bench.stream_idle(events)
    assert idle["span_ms"] == pytest.approx(0.200)
    assert idle["gaps"] == 2 and idle["idle_ms"] == pytest.approx(0.028)
    assert idle["idle_in_gaps_over_20us_ms"] == pytest.approx(0.025)
    assert idle["largest"][0] == {"us": 25.0, "after": "Memset (Device)", "before": "norm"}
    assert bench.stream_idle([]) == {}
