"""Which Linears gain from float8: a small roofline of one Linear's forward + backward, fitted to measured
per-Linear times, and a ``module_filter_fn`` that keeps the Linears it predicts slower in fp8 in high precision.

Per Linear (M tokens, K in, N out), fwd + bwd:

    bf16:  3 GEMMs of 2*M*K*N flops at bf16_tflops * eff
    fp8:   3 GEMMs at fp8_tflops[recipe] * eff
           + cast traffic: bytes per element of x (M*K), grad_output (M*N) and weight (K*N) at hbm_tbps
           + fixed_ms[recipe] (scale arithmetic, extra kernels, launch latency)
    eff = d / (d + small_dim), d = min(K, N): GEMMs with a small side run below peak (N=1024 measured)

The constants are a least-squares fit to MEASURED_SPEEDUPS (times in ms, one H100 80GB, torch 2.11,
M=16384, compiled, 2026-11-27; the fit reproduces every measured speedup within ~0.06 and every
win/loss). They describe the default cast path; refit them from ``scripts/bench_float8.py linear``
(its JSON has the per-shape times) when the casts get faster or the card changes.

Without a GPU at conversion time, the filter cannot measure; a model fitted to measurements is what it
can do. It never keeps a Linear in high precision silently: convert_to_float8_training logs each skip with
the predicted speedup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from torch import nn

from .config import Float8LinearConfig, ScalingGranularity

# (recipe, K, N) -> (bf16 ms, fp8 ms) of one Linear's compiled fwd+bwd at M=16384 on one H100 80GB
# (torch 2.11 + CUDA 13, titan_fp8's torch cast path, 2026-11-27). Rowwise has since moved to the Triton
# casts by default; at M=16384 its gains and losses fall on the same shapes (docs/performance.md), so the
# fit below, made on the torch path, still takes the same decisions there.
MEASURED_M = 16384
MEASURED_MS: dict[tuple[str, int, int], tuple[float, float]] = {
    ("tensorwise", 4096, 1024): (0.799, 1.050),
    ("tensorwise", 4096, 4096): (2.405, 1.941),
    ("tensorwise", 4096, 14336): (8.695, 5.363),
    ("tensorwise", 14336, 4096): (8.899, 5.809),
    ("tensorwise", 8192, 8192): (10.162, 6.220),
    ("rowwise", 4096, 1024): (0.799, 1.128),
    ("rowwise", 4096, 4096): (2.405, 2.229),
    ("rowwise", 4096, 14336): (8.695, 6.062),
    ("rowwise", 14336, 4096): (8.899, 6.676),
    ("rowwise", 8192, 8192): (10.162, 6.825),
}
MEASURED_SPEEDUPS = {key: bf16 / fp8 for key, (bf16, fp8) in MEASURED_MS.items()}

RECIPE_CLASSES = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class Float8PerfModel:
    bf16_tflops: float = 713.0
    fp8_tflops: dict = field(default_factory=lambda: {"tensorwise": 1444.0, "rowwise": 1324.0})
    small_dim: float = 375.0
    hbm_tbps: float = 3.0
    fixed_ms: dict = field(default_factory=lambda: {"tensorwise": 0.437, "rowwise": 0.398})
    # Bytes moved by the casts per element of (x, grad_output, weight): tensorwise reads x for the amax,
    # reads it again for the cast and writes two fp8 layouts (7), grad_output likewise (6), the weight
    # three times; rowwise needs an amax pass and a cast pass per orientation (10).
    cast_bytes: dict = field(
        default_factory=lambda: {"tensorwise": (7.0, 6.0, 8.0), "rowwise": (10.0, 10.0, 10.0)}
    )

    def _eff(self, k: int, n: int) -> float:
        d = min(k, n)
        return d / (d + self.small_dim)

    def bf16_ms(self, m: int, k: int, n: int) -> float:
        return 6.0 * m * k * n / (self.bf16_tflops * 1e9 * self._eff(k, n))

    def float8_ms(self, m: int, k: int, n: int, recipe: str) -> float:
        if recipe not in RECIPE_CLASSES:
            raise ValueError(f"Float8PerfModel: recipe must be one of {RECIPE_CLASSES}, got {recipe!r}")
        gemm = 6.0 * m * k * n / (self.fp8_tflops[recipe] * 1e9 * self._eff(k, n))
        bx, bgy, bw = self.cast_bytes[recipe]
        cast = (bx * m * k + bgy * m * n + bw * k * n) / (self.hbm_tbps * 1e9)
        return gemm + cast + self.fixed_ms[recipe]

    def speedup(self, m: int, k: int, n: int, recipe: str) -> float:
        """Predicted bf16 time / fp8 time of one Linear's fwd+bwd."""
        return self.bf16_ms(m, k, n) / self.float8_ms(m, k, n, recipe)


def recipe_class(config: Union[Float8LinearConfig, str]) -> str:
    """'tensorwise' (tensorwise and delayed scaling) or 'rowwise' (rowwise, rowwise_with_gw_hp)."""
    if isinstance(config, str):
        config = Float8LinearConfig.from_recipe_name(config)
    axiswise = config.cast_config_input.scaling_granularity is ScalingGranularity.AXISWISE
    return "rowwise" if axiswise else "tensorwise"


class SmallGemmFilter:
    """``module_filter_fn`` for convert_to_float8_training: False (keep in high precision) for Linears whose
    predicted fp8 speedup at ``tokens`` tokens per micro-batch is below ``min_speedup``, whose name
    contains one of ``filter_fqns``, or whose dims cannot run fp8 GEMMs. ``skip_reason`` says why."""

    def __init__(
        self,
        config: Union[Float8LinearConfig, str],
        tokens: int,
        *,
        min_speedup: float = 1.0,
        filter_fqns: Iterable[str] = (),
        model: Optional[Float8PerfModel] = None,
    ):
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"SmallGemmFilter: tokens (per micro-batch) must be a positive int, got {tokens!r}")
        if not min_speedup > 0:
            raise ValueError(f"SmallGemmFilter: min_speedup must be > 0, got {min_speedup!r}")
        self.recipe = recipe_class(config)
        self.tokens = tokens
        self.min_speedup = float(min_speedup)
        self.filter_fqns = tuple(filter_fqns)
        self.model = model or Float8PerfModel()

    def skip_reason(self, module: nn.Module, fqn: str) -> Optional[str]:
        from .linear import unconvertible_reason

        matched = [f for f in self.filter_fqns if f and f in fqn]
        if matched:
            return f"name matches filter_fqns {matched}"
        if isinstance(module, nn.Linear):
            reason = unconvertible_reason(module)
            if reason is not None:
                return reason
            k, n = module.in_features, module.out_features
            s = self.model.speedup(self.tokens, k, n, self.recipe)
            if s < self.min_speedup:
                return (
                    f"small GEMM: predicted fp8 speedup {s:.2f}x < {self.min_speedup:.2f}x for "
                    f"M={self.tokens} K={k} N={n} ({self.recipe}; filter_small_gemms)"
                )
        return None

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        return self.skip_reason(module, fqn) is None


def small_gemm_filter(
    config: Union[Float8LinearConfig, str], tokens: int, *, min_speedup: float = 1.0, filter_fqns: Iterable[str] = ()
) -> SmallGemmFilter:
    """The auto filter: see SmallGemmFilter."""
    return SmallGemmFilter(config, tokens, min_speedup=min_speedup, filter_fqns=filter_fqns)
