"""Time one quantised Linear per scheme against dense F.linear (bf16
activations by default), at decode (M=1) and prefill shapes.

    python scripts/quant_kernel_bench.py [--device cuda] [--shapes 4096x4096,14336x4096,4096x14336] [--m 1,16,2048]

Shapes are N x K (out x in) of Llama3-8B Linears. Prints, per scheme and shape: the kernel, time per call
(CUDA events, median of --iters), speedup over the dense Linear, and stored weight bytes relative to bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titan_fp8.quant import SCHEMES, QuantizedTensor, QuantScheme  # noqa: E402


def time_call(fn, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    p.add_argument("--m", default="1,16,2048")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="activation dtype")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, activations {dtype}, int4 group {a.group_size}")
    print(f"{'scheme':38s} {'N x K':>12s} {'M':>5s} {'kernel':>20s} {'ms':>8s} {'dense ms':>8s} {'speedup':>8s} {'bytes':>6s}")
    for shape in a.shapes.split(","):
        n, k = (int(s) for s in shape.split("x"))
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        for m in (int(s) for s in a.m.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            base = time_call(lambda: F.linear(x, w), device, a.iters)
            for scheme_name in SCHEMES:
                qt = QuantizedTensor.from_float(w, QuantScheme.from_name(scheme_name, a.group_size)).with_kernel()
                ms = time_call(lambda: F.linear(x, qt), device, a.iters)
                ratio = qt.nbytes_stored() / (w.numel() * 2)
                print(f"{scheme_name:38s} {shape:>12s} {m:>5d} {qt.kernel:>20s} {ms * 1e3:8.3f} {base * 1e3:8.3f} "
                      f"{base / ms:7.2f}x {ratio:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
