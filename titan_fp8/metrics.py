"""Throughput and training metrics: one console line, TensorBoard scalars and metrics.jsonl per logged step."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s), by device-name substring; the first match wins.
_BF16_PEAK_TFLOPS = (
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),  # SXM
    ("H800", 989.5),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def device_peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak bf16 dense FLOP/s, its name) of the device, or (None, reason) when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None, f"{device.type}: no known bf16 peak, MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, tflops in _BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name} bf16 dense {tflops:g} TFLOP/s"
    return None, f"{name}: no known bf16 peak, MFU not reported"


class ThroughputMeter:
    """Counts tokens and data-loading time between logged steps."""

    def __init__(self, flops_per_token: float, peak_flops: Optional[float]):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, tokens: int, data_time: float) -> None:
        self.tokens += tokens
        self.data_time += data_time

    def read(self) -> dict[str, Optional[float]]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tps = self.tokens / elapsed
        tflops = tps * self.flops_per_token / 1e12
        mfu = 100.0 * tps * self.flops_per_token / self.peak_flops if self.peak_flops else None
        return {"tps": tps, "tflops": tflops, "mfu": mfu, "data_time_pct": 100.0 * self.data_time / elapsed}


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        gib = 1024 ** 3
        stats = torch.cuda.memory_stats(device)
        # Allocator retries (a cudaMalloc that failed, the cache freed, then retried) stall the step on a
        # device-wide sync: a run near the memory limit shows them as slow steps.
        return {"memory_gib": stats.get("active_bytes.all.peak", 0) / gib,
                "memory_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
                "alloc_retries": stats.get("num_alloc_retries", 0)}
    try:
        import resource

        # ru_maxrss is KiB on Linux: the process's peak resident memory stands in for device memory.
        return {"memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
                "memory_reserved_gib": float("nan")}
    except ImportError:  # pragma: no cover - non-POSIX
        return {"memory_gib": float("nan"), "memory_reserved_gib": float("nan")}


class MetricsLogger:
    """Writes metrics on rank 0 only: console, `{dump_folder}/tb/` and `{dump_folder}/metrics.jsonl`."""

    def __init__(self, dump_folder: str, *, enable_tensorboard: bool, rank: int):
        self.enabled = rank == 0
        self.jsonl_path = os.path.join(dump_folder, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            os.makedirs(dump_folder, exist_ok=True)
            if enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(dump_folder, "tb"))

    def log(self, step: int, values: dict[str, Optional[float]], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step}
        record.update({f"{prefix}{k}": (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                       for k, v in values.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k.replace("_", "/", 1) if prefix else k, v, step)
            self.writer.flush()
        logger.info("step %5d  %s", step, _format(record))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format(record: dict) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("val_ppl", "val_ppl {:.2f}"),
                     ("grad_norm", "grad_norm {:.3f}"), ("lr", "lr {:.2e}"), ("tps", "tps {:,.0f}"),
                     ("tflops", "tflops {:.2f}"), ("mfu", "mfu {:.2f}%"), ("memory_gib", "mem {:.2f}GiB"),
                     ("alloc_retries", "retries {:.0f}"), ("data_time_pct", "data {:.1f}%"),
                     ("skipped_steps", "skipped {:d}")):
        v = record.get(key)
        if v is not None:
            parts.append(fmt.format(v))
    return "  ".join(parts)
