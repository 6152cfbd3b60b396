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


def test_linear_smoke_runs(repo_root, tmp_path):
    result = run_bench(repo_root, tmp_path, "linear", "--variants", "bf16,tensorwise")
    assert result["mode"] == "linear" and len(result["linear"]) == 5  # the five shapes, scaled down
    for shape in result["linear"].values():
        assert shape["bf16"]["ms"] > 0 and shape["tensorwise"]["ms"] > 0
        assert len(shape["tensorwise"]["sqnr"].split("/")) == 3  # output / grad_input / grad_weight vs bf16, dB
