"""Float8 training speed: bf16 vs our recipes (default and with each speed switch) vs torchao, in ONE
process on the same inputs (CUDA only).

  python scripts/bench_float8.py linear                 # per-Linear fwd+bwd at M=16384, 5 shapes
  python scripts/bench_float8.py e2e                    # 4 Llama3-8B layers, batch 2 x 8192, AdamW step,
                                                        # the trainer's fused head + loss (--loss eager: as
                                                        # in the session 4 tables of docs/performance.md)
  python scripts/bench_float8.py linear --variants bf16,tensorwise,tensorwise+triton+save8

Variants (comma-separated with --variants; default: DEFAULT_VARIANTS[mode]):
  bf16                      plain nn.Linear, bf16
  RECIPE                    titan_fp8 recipe with default settings: tensorwise, rowwise, rowwise_with_gw_hp, delayed
                            (rowwise's defaults include triton)
  RECIPE+SWITCH[+SWITCH..]  with Float8LinearConfig switches on:
      plain    cast_backend="torch", save_float8_for_backward=False first (the recipe without speed
                                               defaults; other switches then turn things back on)
      triton   cast_backend="triton"          fused Triton cast kernels (one amax pass + one dual-layout pass)
      inline   cast_backend="triton_inline"   the same kernels, launched from torch.compile's generated code
      save8    save_float8_for_backward=True   fp8 input (transposed) saved for backward, cast in one forward pass
      reuse    reuse_float8_weight=True        fp8 weight cast once per optimizer step (in `linear`: the weight
                                               never changes, so this is the cost of micro-batches 2..n)
      filter   small-GEMM auto filter          Linears predicted slower in fp8 stay bf16 (in `linear`: the
                                               shape's result is bf16's when filtered, else the variant's without it)
  torchao_RECIPE            torchao's same recipe (when torchao is importable; delayed: n/a)

Per variant it reports ms, speedup over bf16, ratio to torchao's same recipe, peak memory, numerics (SQNR of
output and gradients vs bf16, linear mode) and where the GPU time goes (GEMM / our cast kernels / inductor
kernels / attention / other, from one profiled step). `e2e` also prints the bound (bf16 step minus the
eligible GEMMs' bf16 time plus the same GEMMs at the measured `_scaled_mm` rate) and the share of that
possible gain each variant captures. A time budget (--budget_s) skips what would not fit and says so; the
table comes last and JSON goes to $OUT/bench_float8_<mode>.json (or --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from titan_fp8.float8 import (  # noqa: E402
    Float8LinearConfig,
    convert_to_float8_training,
    invalidate_float8_weights,
    precompute_float8_weights,
    small_gemm_filter,
    sync_float8_amax_and_scale_history,
)
from titan_fp8.loss import cross_entropy_loss  # noqa: E402
from titan_fp8.models import Transformer, llama3_flavors  # noqa: E402

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "delayed")
SWITCHES = ("plain", "triton", "inline", "save8", "reuse", "filter")
# Most informative first: a budget cut loses the tail.
LINEAR_SHAPES = ((4096, 4096), (4096, 1024), (8192, 8192), (4096, 14336), (14336, 4096))
DEFAULT_VARIANTS = {
    "linear": (
        "bf16,tensorwise,torchao_tensorwise,rowwise,torchao_rowwise,delayed,rowwise+plain,tensorwise+triton+save8,"
        "delayed+triton+save8,tensorwise+filter,rowwise+filter,delayed+filter"
    ),
    # ~20-30 s per variant on an H100 (mostly compile); the budget may cut the last ones.
    "e2e": (
        "bf16,tensorwise,torchao_tensorwise,delayed,rowwise,torchao_rowwise,rowwise+plain,tensorwise+filter,"
        "delayed+filter,tensorwise+triton+save8"
    ),
}


# ---------------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "bf16", "ours", "torchao"
    recipe: Optional[str] = None
    switches: frozenset = frozenset()

    @property
    def base_name(self) -> str:
        """The measured variant behind a +filter one (linear mode)."""
        if "filter" not in self.switches:
            return self.name
        return "+".join([self.recipe, *[s for s in SWITCHES if s in self.switches and s != "filter"]])

    def float8_config(self) -> Float8LinearConfig:
        config = Float8LinearConfig.from_recipe_name(self.recipe)
        if "plain" in self.switches:
            config = dataclasses.replace(config, cast_backend="torch", save_float8_for_backward=False)
        on = {"triton": dict(cast_backend="triton"), "inline": dict(cast_backend="triton_inline"),
              "save8": dict(save_float8_for_backward=True),
              "reuse": dict(reuse_float8_weight=True)}
        for switch, fields in on.items():
            if switch in self.switches:
                config = dataclasses.replace(config, **fields)
        return config


def parse_variant(name: str) -> Variant:
    name = name.strip()
    if name == "bf16":
        return Variant(name, "bf16")
    if name.startswith("torchao_"):
        recipe = name[len("torchao_"):]
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe in variant {name!r}; recipes: {RECIPES}")
        return Variant(name, "torchao", recipe)
    recipe, *switches = name.split("+")
    if recipe not in RECIPES or any(s not in SWITCHES for s in switches):
        raise SystemExit(f"bad variant {name!r}: RECIPE[+SWITCH...] with RECIPE in {RECIPES}, SWITCH in {SWITCHES}")
    canonical = "+".join([recipe, *[s for s in SWITCHES if s in switches]])
    return Variant(canonical, "ours", recipe, frozenset(switches))


# ---------------------------------------------------------------------------------------------------- helpers


def torchao_available() -> bool:
    try:
        import torchao.float8  # noqa: F401

        return True
    except Exception:
        return False


def convert_torchao(module: nn.Module, recipe: str, filter_fn) -> Optional[nn.Module]:
    """torchao's same recipe, or None where torchao has no such recipe (delayed was removed upstream)."""
    from torchao.float8 import Float8LinearConfig as AOConfig
    from torchao.float8 import convert_to_float8_training as ao_convert

    try:
        config = AOConfig.from_recipe_name(recipe)
    except Exception:
        return None
    return ao_convert(module, config=config, module_filter_fn=filter_fn)


# "cuda" for real runs; "cpu" only for --smoke (a functional dry run of this script on tiny shapes).
DEVICE = "cuda"
COMPILE_BACKEND = "inductor"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run: times are meaningless)"


def bench_ms(fn: Callable[[], None], warmup: int = 5, iters: int = 20) -> float:
    """Median time of one fn() in ms. On CUDA the iterations run back to back, as in training: the CPU
    queues iteration i+1 while the GPU runs iteration i, and a CUDA event pair around each iteration
    measures the GPU stream's time for it, idle gaps included (a CPU-bound variant still shows up);
    one synchronize at the end. (A synchronize after every iteration would add each variant's CPU
    launch latency before its first kernel, which a training loop never waits for.)"""
    for _ in range(warmup):
        fn()
    sync()
    if DEVICE != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    else:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    times.sort()
    return times[len(times) // 2]


def reset_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else 0.0


def sqnr_db(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.float(), actual.float()
    err = (ref - actual).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


_GEMM_MARKERS = ("gemm", "cutlass", "nvjet", "xmma", "cublas", "scaled_mm", "wgmma")
_OUR_KERNELS = ("_cast_2d_kernel", "_amax_kernel", "_amax_rows_cols_kernel")


def _kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in name for k in _OUR_KERNELS):
        return "our_casts"
    # Inductor names a kernel after the ops it came from, so a layout copy or cast that inductor inserts
    # for a `_scaled_mm` operand is called "triton_poi_fused__scaled_mm_..": test for inductor before the
    # GEMM markers (only its GEMM templates, "triton_tem_", are GEMMs).
    if low.startswith("triton_tem"):
        return "gemm"
    if low.startswith("triton"):
        return "inductor"
    if "flash" in low or "fmha" in low or "attention" in low:
        return "attention"
    if any(k in low for k in _GEMM_MARKERS):
        return "gemm"
    return "other"


def stream_idle(events: list[dict]) -> dict:
    """How long the GPU sat idle inside one profiled step, from its chrome trace's events: the time between
    the first kernel's start and the last one's end when no kernel, copy or memset ran on any stream. Each
    gap between back-to-back kernels is a few µs; a long one means the GPU waited for the host. (The
    profiled step starts after a synchronize, so its first kernels wait for the host by construction: the
    largest gap, after the embedding's gather, is that; back to back, the host runs ahead.)"""
    busy = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])
    if not busy:
        return {}
    first, end, prev = busy[0]["ts"], busy[0]["ts"] + busy[0]["dur"], busy[0]
    gaps = []
    for e in busy[1:]:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, prev["name"], e["name"]))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    us = [g[0] for g in gaps]
    return {"span_ms": (end - first) / 1e3, "idle_ms": sum(us) / 1e3, "gaps": len(gaps),
            "idle_in_gaps_over_20us_ms": sum(u for u in us if u >= 20) / 1e3,
            "largest": [{"us": round(u, 1), "after": a[:80], "before": b[:80]}
                        for u, a, b in sorted(gaps, key=lambda g: -g[0])[:3]]}


def profile_breakdown(fn: Callable[[], None]) -> dict:
    """GPU time of one call of fn() by kernel class (ms), from torch.profiler."""
    if DEVICE != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out = {"gemm": 0.0, "our_casts": 0.0, "inductor": 0.0, "attention": 0.0, "other": 0.0}
        kernels = 0
        per_kernel = []
        for evt in prof.key_averages():
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0.0)
            cls = _kernel_class(evt.key)
            out[cls] += us / 1e3
            kernels += evt.count
            per_kernel.append({"name": evt.key[:160], "class": cls, "count": evt.count, "ms": us / 1e3})
        out["kernels"] = kernels
        # Every kernel by time: the JSON keeps all of them, --top_kernels prints the largest.
        out["per_kernel"] = sorted(per_kernel, key=lambda k: -k["ms"])
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace) as f:
                out["idle"] = stream_idle(json.load(f).get("traceEvents", []))
        return out
    except Exception as e:  # never let profiling cost the measurement
        return {"error": repr(e)[:200]}


TOP_KERNELS = 0  # --top_kernels


def print_top_kernels(b: Optional[dict]) -> None:
    if TOP_KERNELS <= 0 or not b or "per_kernel" not in b:
        return
    for k in b["per_kernel"][:TOP_KERNELS]:
        print(f"      {k['ms']:8.2f} ms {k['count']:4d}x  {k['class']:<9} {k['name'][:110]}", flush=True)


def fmt_breakdown(b: Optional[dict]) -> str:
    if not b or "error" in b:
        return "" if not b else f"profile error: {b['error']}"
    return (f"gemm {b['gemm']:.2f} | our casts {b['our_casts']:.2f} | inductor {b['inductor']:.2f} | "
            f"attn {b['attention']:.2f} | other {b['other']:.2f} ms | {b['kernels']} kernels"
            + (f" | GPU idle in the step {b['idle']['idle_ms']:.2f} ms ({b['idle']['gaps']} gaps, "
               f"{b['idle']['idle_in_gaps_over_20us_ms']:.2f} ms in gaps >= 20 us)" if b.get("idle") else ""))


_DUMP: Optional[Callable[[], None]] = None  # writes the JSON so far (set by main): a killed run keeps its results


def dump_partial() -> None:
    if _DUMP is not None:
        try:
            _DUMP()
        except Exception as e:  # pragma: no cover
            print(f"warning: could not write partial JSON: {e!r}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.start = time.time()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def triton_self_check() -> Optional[str]:
    """None if our Triton cast kernels agree bit for bit with the torch reference on this GPU."""
    try:
        from titan_fp8.float8 import kernels as K

        if not K.HAVE_TRITON:
            return "triton not importable"
        torch.manual_seed(0)
        x = (torch.randn(1000, 784, device=DEVICE) * 30).to(torch.bfloat16)
        if not torch.equal(K.triton_amax(x), x.abs().amax().float()):
            return "amax mismatch"
        r1, c1 = K.triton_amax_rows_cols(x, True, True)
        r2, c2 = K.torch_amax_rows_cols(x, True, True)
        if not (torch.equal(r1, r2) and torch.equal(c1, c2)):
            return "rows/cols amax mismatch"
        for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = torch.tensor(5.5, device=DEVICE)
            a = K.triton_cast_2d(x, s, s, dt, False, True, True, True)
            b = K.torch_cast_2d(x, s, s, dt, False, True, True, True)
            if not all(torch.equal(p.view(torch.uint8) if p.dtype == dt else p, q.view(torch.uint8) if q.dtype == dt else q)
                       for p, q in zip(a, b)):
                return f"tensorwise cast mismatch ({dt})"
        rs, cs = 448.0 / r2, 448.0 / c2
        a = K.triton_cast_2d(x, rs, cs, torch.float8_e4m3fn, True, True, True, False)
        b = K.torch_cast_2d(x, rs, cs, torch.float8_e4m3fn, True, True, True, False)
        if not all(torch.equal(p.view(torch.uint8), q.view(torch.uint8)) for p, q in zip(a[:2], b[:2])):
            return "rowwise cast mismatch"
        return None
    except Exception as e:
        return f"exception: {e!r}"[:300]


# ---------------------------------------------------------------------------------------------------- GEMM ceilings


def gemm_ms(m: int, k: int, n: int, fp8: bool) -> float:
    """One GEMM (M,K)x(K,N): bf16 matmul or tensorwise fp8 _scaled_mm with fast accumulation."""
    a = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    if not fp8:
        return bench_ms(lambda: a @ b.t())
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=DEVICE)
    return bench_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                             use_fast_accum=True))


def linear_gemms_ms(m: int, k: int, n: int, fp8: bool) -> float:
    """The three GEMMs of one Linear's fwd+bwd: (M,K)x(K,N), (M,N)x(N,K), (N,M)x(M,K)."""
    return gemm_ms(m, k, n, fp8) + gemm_ms(m, n, k, fp8) + gemm_ms(n, m, k, fp8)


# ---------------------------------------------------------------------------------------------------- (a) per-Linear


def _measured(measure: Callable[[], dict]) -> dict:
    """One measurement: its result, or the error it raised; compile caches and memory reset after it."""
    t0 = time.time()
    try:
        r = measure()
    except Exception as e:
        r = {"error": f"{type(e).__name__}: {e}"[:400]}
        traceback.print_exc()
    finally:
        torch._dynamo.reset()
        reset_memory()
    r["wall_s"] = time.time() - t0
    return r


def _with_round(prev: Optional[dict], r: dict) -> dict:
    """Fold a round's successful result into the earlier rounds' (``prev``, None in the first): ms = the median
    of ``ms_rounds``, the peak the largest seen."""
    if prev is None:
        r["ms_rounds"] = [r["ms"]]
        return r
    prev["ms_rounds"].append(r["ms"])
    prev["ms"] = statistics.median(prev["ms_rounds"])
    prev["gib"] = max(prev["gib"], r["gib"])
    return prev


def bench_linear(m: int, variants: list[Variant], with_ao: bool, budget: Budget, profile: bool,
                 iters: int, rounds: int = 1, partial: Optional[dict] = None) -> dict:
    measured = []
    for v in variants:
        base = parse_variant(v.base_name)
        if base.name not in [x.name for x in measured]:
            measured.append(base)
    results: dict = partial if partial is not None else {}
    results.update({f"{k}x{n}": {} for k, n in LINEAR_SHAPES})
    refs: dict = {}

    def fresh(k, n):
        torch.manual_seed(0)
        return nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)

    # Rounds as in e2e: every (variant, shape) once per round, the variants' order reversed on odd rounds so that
    # a drift of the card does not favour whichever runs first; ms = the median over the rounds. Round 1 alone
    # checks numerics (bf16 first, the reference) and profiles.
    for rnd in range(rounds):
        for v in (measured if rnd % 2 == 0 else measured[::-1]):  # variants outer: a budget cut drops variants
            for k, n in LINEAR_SHAPES:
                key = f"{k}x{n}"
                prev = results[key].get(v.name)
                if prev is not None and "ms" not in prev:
                    continue  # skipped or failed in an earlier round
                if budget.left() < 0:
                    if prev is None:
                        results[key][v.name] = {"skipped": "time budget"}
                    continue
                if v.kind == "torchao" and not with_ao:
                    results[key][v.name] = {"skipped": "torchao not importable"}
                    continue
                # The kernel breakdown at the first (most informative) shape only: the profiler costs ~1 s.
                prof = profile and rnd == 0 and (k, n) == LINEAR_SHAPES[0]
                r = _measured(lambda: _one_linear(v, m, k, n, fresh, refs, prof, iters, numerics=rnd == 0))
                if "ms" in r:
                    r = _with_round(prev, r)
                results[key][v.name] = r
                bf = results[key].get("bf16", {}).get("ms")
                msg = (f"{r['ms_rounds'][-1]:.3f} ms" + (f" ({bf / r['ms_rounds'][-1]:.2f}x)" if bf and v.name != "bf16" else "") +
                       f", {r['gib']:.2f} GiB, sqnr out/gx/gw {r.get('sqnr', '')}" if "ms" in r else str(r))
                print(f"[{budget.elapsed():5.0f}s] {key} {v.name}" + (f" round {rnd + 1}" if rounds > 1 else "")
                      + f": {msg} ({r['wall_s']:.0f}s) " + (fmt_breakdown(r.get("profile")) if rnd == 0 else ""),
                      flush=True)
                if rnd == 0:
                    print_top_kernels(r.get("profile"))
                dump_partial()

    # +filter variants: bf16's result where the filter keeps the shape in bf16, else the base variant's.
    for v in variants:
        if "filter" not in v.switches:
            continue
        filt = small_gemm_filter(v.float8_config(), m)
        for k, n in LINEAR_SHAPES:
            key = f"{k}x{n}"
            keep_bf16 = not filt(nn.Linear(k, n, bias=False, device="meta"), "linear")
            src = results[key].get("bf16" if keep_bf16 else v.base_name, {"skipped": "not measured"})
            results[key][v.name] = {**src, "filtered_to_bf16": keep_bf16}
    for key, row in results.items():
        bf = row.get("bf16", {})
        for name, r in row.items():
            if "ms" in bf and "ms" in r:
                r["speedup"] = bf["ms"] / r["ms"]
            ao = row.get(f"torchao_{parse_variant(name).recipe}", {}) if name != "bf16" else {}
            if "ms" in ao and "ms" in r and not name.startswith("torchao_"):
                r["vs_torchao"] = ao["ms"] / r["ms"]
                # per round: torchao's time over ours in the same round (its spread is the run's own noise)
                r["vs_torchao_rounds"] = [a / x for a, x in zip(ao["ms_rounds"], r["ms_rounds"])]
    return results


def _one_linear(v: Variant, m: int, k: int, n: int, fresh, refs: dict, profile: bool, iters: int,
                numerics: bool = True) -> dict:
    torch.manual_seed(1)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
    module = nn.Sequential(fresh(k, n))
    if v.kind == "ours":
        module = convert_to_float8_training(module, config=v.float8_config())
    elif v.kind == "torchao":
        module = convert_torchao(module, v.recipe, None)
        if module is None:
            return {"skipped": "n/a in torchao"}
    fn = torch.compile(module, dynamic=False, backend=COMPILE_BACKEND)
    delayed = v.kind == "ours" and v.recipe == "delayed"
    reuse = "reuse" in v.switches

    def step():
        fn(x).backward(grad)

    if delayed:
        module(x).backward(grad)  # one eager step, then the history exists: one compiled graph, not two
        sync_float8_amax_and_scale_history(module)
    if reuse:
        precompute_float8_weights(module)
    t0 = time.time()
    step()
    sync()
    compile_s = time.time() - t0
    reset_peak()
    ms = bench_ms(step, warmup=3, iters=iters)
    res = {"ms": ms, "gib": peak_gib(), "compile_s": compile_s}

    if not numerics:
        return res
    # Numerics of one fresh fwd+bwd against bf16 (same weights, inputs and gradient).
    x.grad = None
    for p in module.parameters():
        p.grad = None
    out = fn(x)
    out.backward(grad)
    vals = (out.detach(), x.grad, next(module.parameters()).grad)
    if v.kind == "bf16":
        refs[(k, n)] = tuple(t.cpu() for t in vals)  # on the host: not part of later variants' peak memory
    elif (k, n) in refs:
        res["sqnr"] = "/".join(f"{sqnr_db(r.to(a.device), a):.1f}" for r, a in zip(refs[(k, n)], vals))
    del out, vals
    if profile:
        res["profile"] = profile_breakdown(step)
    return res


# ---------------------------------------------------------------------------------------------------- (b) end to end


def build_model(flavor: str, n_layers: int, vocab_size: int) -> Transformer:
    args = dataclasses.replace(llama3_flavors[flavor], n_layers=n_layers, vocab_size=vocab_size)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=DEVICE)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    model.to(torch.bfloat16)
    with torch.no_grad():
        model.init_weights()  # recompute the RoPE table in fp32 after the cast (weights are re-drawn, same seed)
    return model


def not_output(module: nn.Module, fqn: str) -> bool:
    return "output" not in fqn


def bench_e2e(a, variants: list[Variant], with_ao: bool, budget: Budget, partial: Optional[dict] = None) -> dict:
    tokens = torch.randint(0, a.vocab, (a.grad_accum, a.batch, a.seq_len), device=DEVICE)
    results: dict = partial if partial is not None else {}
    results.update({"flavor": a.flavor, "n_layers": a.n_layers, "batch": a.batch, "seq_len": a.seq_len,
                    "vocab": a.vocab, "grad_accum": a.grad_accum, "loss": a.loss, "variants": {}})
    step_tokens = a.grad_accum * a.batch * a.seq_len

    # Rounds: every variant once per round, the order reversed on odd rounds, so that a drift of the card
    # (clocks, temperature) over the run does not favour whichever variant runs first. Each variant's
    # ms/step is its median over the rounds; the first round also profiles.
    for rnd in range(a.rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            prev = results["variants"].get(v.name)
            if prev is not None and "ms" not in prev:
                continue  # skipped or failed in an earlier round
            if budget.left() < 0:
                if prev is None:
                    results["variants"][v.name] = {"skipped": "time budget"}
                print(f"[{budget.elapsed():5.0f}s] e2e {v.name} round {rnd + 1}: skipped (time budget)", flush=True)
                continue
            if v.kind == "torchao" and not with_ao:
                results["variants"][v.name] = {"skipped": "torchao not importable"}
                continue
            r = _measured(lambda: _one_e2e(v, a, tokens, profile=a.profile and rnd == 0))
            if "ms" not in r:
                results["variants"][v.name] = r
                print(f"[{budget.elapsed():5.0f}s] e2e {v.name}: {r}", flush=True)
                continue
            r = results["variants"][v.name] = _with_round(prev, r)
            r["tok_s"] = step_tokens / r["ms"] * 1e3
            print(f"[{budget.elapsed():5.0f}s] e2e {v.name} round {rnd + 1}: {r['ms_rounds'][-1]:.1f} ms/step, "
                  f"{r['gib']:.1f} GiB, compile {r['compile_s']:.0f}s"
                  + (f"; {fmt_breakdown(r.get('profile'))}" if rnd == 0 else ""), flush=True)
            if rnd == 0:
                print_top_kernels(r.get("profile"))
            dump_partial()

    # The bound: replace every eligible Linear's three bf16 GEMMs by fp8 ones at the measured rate.
    args = llama3_flavors[a.flavor]
    m, dim, ffn = a.batch * a.seq_len, args.dim, args.ffn_hidden_dim
    kv = args.num_kv_heads * args.head_dim
    shapes = [(dim, dim), (dim, kv), (dim, kv), (dim, dim), (dim, ffn), (dim, ffn), (ffn, dim)]
    try:
        bf16_gemms = a.grad_accum * a.n_layers * sum(linear_gemms_ms(m, k, n, False) for k, n in shapes)
        fp8_gemms = a.grad_accum * a.n_layers * sum(linear_gemms_ms(m, k, n, True) for k, n in shapes)
    except Exception as e:
        results["bound_error"] = repr(e)
        return results
    base = results["variants"].get("bf16", {})
    if "ms" not in base:
        return results
    bound = base["ms"] - bf16_gemms + fp8_gemms
    results["bound"] = {"ms": bound, "speedup": base["ms"] / bound, "eligible_bf16_ms": bf16_gemms,
                        "eligible_fp8_ms": fp8_gemms, "eligible_share": bf16_gemms / base["ms"]}
    for name, r in results["variants"].items():
        if "ms" not in r or name == "bf16":
            continue
        r["speedup"] = base["ms"] / r["ms"]
        # per-round ratios (against the same round's bf16): their spread is the run's own noise
        r["speedup_rounds"] = [b / x for b, x in zip(base["ms_rounds"], r["ms_rounds"])]
        r["share_of_possible_gain"] = (base["ms"] - r["ms"]) / (base["ms"] - bound) if base["ms"] > bound else float("nan")
        r["memory_vs_bf16"] = r["gib"] / base["gib"] if base["gib"] else float("nan")
        ao = results["variants"].get(f"torchao_{parse_variant(name).recipe}", {})
        if "ms" in ao and not name.startswith("torchao_"):
            r["vs_torchao"] = ao["ms"] / r["ms"]
    return results


def _one_e2e(v: Variant, a, tokens: torch.Tensor, profile: bool) -> dict:
    model = build_model(a.flavor, a.n_layers, a.vocab)
    reuse = "reuse" in v.switches
    delayed = v.kind == "ours" and v.recipe == "delayed"
    if v.kind == "ours":
        config = v.float8_config()
        filt = (small_gemm_filter(config, a.batch * a.seq_len, filter_fqns=["output"]) if "filter" in v.switches
                else not_output)
        convert_to_float8_training(model, config=config, module_filter_fn=filt)
    elif v.kind == "torchao":
        if convert_torchao(model, v.recipe, not_output) is None:
            return {"skipped": "n/a in torchao"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    # The trainer's loss: by default the output head computes it (one logits-sized buffer), its kernels
    # compiled as the trainer compiles them (compile.components = model, loss).
    fused = a.loss == "fused" and model.fuses_loss
    model.output.compile_loss = COMPILE_BACKEND == "inductor"
    loss_fn = (None if fused else cross_entropy_loss if a.loss == "eager"
               else torch.compile(cross_entropy_loss, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND))

    def step():
        if reuse:
            precompute_float8_weights(model)
        for micro in range(a.grad_accum):
            if fused:
                loss = model(tokens[micro], labels=tokens[micro])
            else:
                logits = model(tokens[micro])
                loss = loss_fn(logits, tokens[micro])
                del logits  # as the trainer: from here only the loss keeps what its backward reads
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if delayed:
            sync_float8_amax_and_scale_history(model)
        if reuse:
            invalidate_float8_weights(model)

    if delayed:
        step()  # one eager step: the amax history exists before compiling (one graph instead of two)
    for block in model.layers.values():
        block.compile(fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
    t0 = time.time()
    step()
    sync()
    compile_s = time.time() - t0
    reset_memory()
    ms = bench_ms(step, warmup=2, iters=a.steps)
    res = {"ms": ms, "gib": peak_gib(), "compile_s": compile_s}
    if profile:
        res["profile"] = profile_breakdown(step)
    return res


# ---------------------------------------------------------------------------------------------------- tables


def print_linear_table(results: dict, variants: list[Variant], m: int) -> None:
    keys = list(results)
    print(f"\nper-Linear fwd+bwd, M={m}: speedup over bf16 (ms in JSON); *: filtered to bf16; "
          f"[x.xx]: ours/torchao same recipe")
    print(f"{'variant':<34}" + "".join(f"{k:>17}" for k in keys))
    print(f"{'bf16 ms':<34}" + "".join(f"{results[k].get('bf16', {}).get('ms', float('nan')):>17.3f}" for k in keys))
    for v in variants:
        if v.name == "bf16":
            continue
        cells = []
        for k in keys:
            r = results[k].get(v.name, {})
            if "speedup" not in r:
                cells.append("skip" if "skipped" in r else ("ERR" if "error" in r else "-"))
                continue
            c = f"{r['speedup']:.2f}" + ("*" if r.get("filtered_to_bf16") else "")
            if "vs_torchao" in r:
                c += f" [{r['vs_torchao']:.2f}]"
            cells.append(c)
        print(f"{v.name:<34}" + "".join(f"{c:>17}" for c in cells))
    rounds = max((len(r.get("ms_rounds", [])) for row in results.values() for r in row.values()), default=1)
    if rounds <= 1:
        return
    print(f"median of {rounds} rounds (order alternating)")
    lines = []
    for v in variants:
        cells = []
        for k in keys:
            per_round = results[k].get(v.name, {}).get("vs_torchao_rounds")
            cells.append(f"{min(per_round):.3f}-{max(per_round):.3f}" if per_round else "")
        if any(cells):
            lines.append(f"{v.name:<34}" + "".join(f"{c:>17}" for c in cells))
    if lines:
        print("per-round range of [ours/torchao]:\n" + "\n".join(lines))


def print_e2e_table(results: dict, variants: list[Variant]) -> None:
    vs = results["variants"]
    base = vs.get("bf16", {})
    print(f"\nend to end: {results['n_layers']} x {results['flavor']} layers, batch {results['batch']} x "
          f"{results['seq_len']}, grad_accum {results['grad_accum']}, vocab {results['vocab']}, {results['loss']} loss "
          f"({device_name()}, torch {torch.__version__})")
    b = results.get("bound")
    if b:
        print(f"eligible GEMMs: {b['eligible_bf16_ms']:.1f} ms of {base['ms']:.1f} ms bf16 "
              f"({100 * b['eligible_share']:.0f}%); at fp8 rate {b['eligible_fp8_ms']:.1f} ms -> bound "
              f"{b['ms']:.1f} ms = {b['speedup']:.3f}x")
    rounds = max((len(x.get("ms_rounds", [])) for x in vs.values()), default=1)
    if rounds > 1:
        print(f"median of {rounds} rounds (order alternating); 'rounds': the per-round speedups' range")
    print(f"{'variant':<40}{'ms/step':>9}{'tok/s':>10}{'speedup':>9}{'of gain':>9}{'GiB':>7}{'mem':>6}{'/torchao':>9}"
          + (f"{'rounds':>15}" if rounds > 1 else ""))
    for v in variants:
        x = vs.get(v.name, {})
        if "ms" not in x:
            why = x.get("skipped") or x.get("error", "not run")
            print(f"{v.name:<40}  {why[:80]}")
            continue
        sp = x.get("speedup", 1.0)
        gain = x.get("share_of_possible_gain")
        gain_s = f"{100 * gain:>8.0f}%" if gain is not None and not math.isnan(gain) else f"{'':>9}"
        vs_ao = f"{x['vs_torchao']:.3f}" if "vs_torchao" in x else ""
        per_round = x.get("speedup_rounds", [])
        spread = f"{min(per_round):.3f}-{max(per_round):.3f}" if rounds > 1 and per_round else ""
        print(f"{v.name:<40}{x['ms']:>9.1f}{x['tok_s']:>10,.0f}{sp:>9.3f}{gain_s}{x['gib']:>7.1f}"
              f"{x.get('memory_vs_bf16', 1.0):>6.2f}{vs_ao:>9}" + (f"{spread:>15}" if rounds > 1 else ""))


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("linear", "e2e"))
    p.add_argument("--variants", default=None, help="comma-separated (see above); default depends on mode")
    p.add_argument("--m", type=int, default=16384, help="linear: tokens")
    p.add_argument("--shapes", default=None, help="linear: comma-separated KxN (default: the five shapes above); "
                   "the first one is profiled")
    p.add_argument("--iters", type=int, default=20, help="linear: timed iterations per measurement")
    p.add_argument("--flavor", default="8B")
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--grad_accum", type=int, default=1, help="e2e: micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=8, help="e2e: timed steps")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every variant (linear: every variant and shape) this many times, alternating the "
                        "order (ms = the median)")
    p.add_argument("--loss", choices=("fused", "compiled", "eager"), default="fused",
                   help="e2e: the fp32 cross-entropy fused into the output head (the trainer's default: the logits' "
                        "gradient overwrites them), compiled after a separate head (logits and their gradient both "
                        "live), or eager (also their fp32 copies; the setting of the session 4 tables in docs/performance.md)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="stop starting new measurements after this many seconds, then print and exit "
                        "(default: linear 480, e2e 360: one e2e variant takes about a minute)")
    p.add_argument("--no_profile", dest="profile", action="store_false", help="skip the per-variant kernel breakdown")
    p.add_argument("--no_torchao", action="store_true")
    p.add_argument("--top_kernels", type=int, default=0, help="print the N longest kernels of each profiled variant")
    p.add_argument("--json", default=None, help="default: $OUT/bench_float8_<mode>.json when $OUT is set")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="functional dry run on CPU with tiny shapes (checks this script, measures nothing)")
    a = p.parse_args()
    global DEVICE, LINEAR_SHAPES, COMPILE_BACKEND, TOP_KERNELS
    COMPILE_BACKEND = a.compile_backend
    TOP_KERNELS = a.top_kernels
    if a.smoke:
        DEVICE = "cpu"
        COMPILE_BACKEND = "aot_eager" if a.compile_backend == "inductor" else a.compile_backend
        LINEAR_SHAPES = tuple((k // 64, n // 64) for k, n in LINEAR_SHAPES)
        a.m, a.iters, a.flavor, a.n_layers, a.batch, a.seq_len, a.vocab, a.steps = 64, 2, "debugmodel", 1, 1, 64, 512, 2
        a.no_torchao = True
    elif a.shapes:
        try:
            LINEAR_SHAPES = tuple(tuple(int(d) for d in sh.lower().split("x")) for sh in a.shapes.split(","))
            assert all(len(sh) == 2 for sh in LINEAR_SHAPES)
        except (ValueError, AssertionError):
            print(f"error: --shapes {a.shapes!r}: expected comma-separated KxN, e.g. 4096x4096,8192x8192",
                  file=sys.stderr)
            return 2
    if a.rounds < 1 or a.steps < 1:
        print(f"error: --rounds and --steps must be >= 1, got {a.rounds} and {a.steps}", file=sys.stderr)
        return 2
    if not a.smoke and not torch.cuda.is_available():
        print("error: bench_float8.py needs a CUDA GPU (or --smoke for a CPU dry run)", file=sys.stderr)
        return 2
    budget = Budget(a.budget_s if a.budget_s is not None else {"linear": 480.0, "e2e": 360.0}[a.mode])
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    variants = [parse_variant(s) for s in (a.variants or DEFAULT_VARIANTS[a.mode]).split(",") if s.strip()]
    if "bf16" not in [v.name for v in variants]:
        variants.insert(0, parse_variant("bf16"))
    with_ao = torchao_available() and not a.no_torchao
    ao_version = None
    if with_ao:
        import torchao

        ao_version = getattr(torchao, "__version__", "?")
    out = {"device": device_name(), "torch": torch.__version__, "torchao": ao_version,
           "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "mode": a.mode}
    print(f"device {out['device']}, torch {out['torch']}, torchao {ao_version or 'no'}, {out['date']}", flush=True)

    uses_triton = [v.name for v in variants if v.kind == "ours" and v.float8_config().cast_backend != "torch"]
    if uses_triton and DEVICE == "cuda":
        problem = triton_self_check()
        out["triton_self_check"] = problem or "bit-exact vs torch reference"
        print(f"triton cast kernels: {out['triton_self_check']}", flush=True)
        if problem:
            print(f"WARNING: dropping {', '.join(uses_triton)} (the Triton cast kernels do not match the reference)",
                  flush=True)
            variants = [v for v in variants if v.name not in uses_triton]

    gm, gk, gn = (16384, 4096, 14336) if DEVICE == "cuda" else (64, 64, 224)
    flops = 2 * gm * gk * gn
    c = out[f"gemm_ceiling_{gm}x{gk}x{gn}"] = {"bf16_tflops": flops / gemm_ms(gm, gk, gn, False) / 1e9,
                                              "fp8_tflops": flops / gemm_ms(gm, gk, gn, True) / 1e9}
    print(f"GEMM ceilings {gm}x{gk}x{gn}: bf16 {c['bf16_tflops']:.0f}, fp8 {c['fp8_tflops']:.0f} TFLOP/s", flush=True)

    path = a.json or (os.path.join(os.environ["OUT"], f"bench_float8_{a.mode}.json") if os.environ.get("OUT") else None)

    def write_json() -> None:
        out["elapsed_s"] = budget.elapsed()
        if path:
            with open(path, "w") as f:
                json.dump(out, f, indent=1, default=str)

    global _DUMP
    _DUMP = write_json
    if a.mode == "linear":
        out["linear"] = {}
        out["linear"] = bench_linear(a.m, variants, with_ao, budget, a.profile, a.iters, a.rounds,
                                     partial=out["linear"])
    else:
        out["e2e"] = {}
        out["e2e"] = bench_e2e(a, variants, with_ao, budget, partial=out["e2e"])
    write_json()
    if a.mode == "linear":
        print_linear_table(out["linear"], variants, a.m)
    else:
        print_e2e_table(out["e2e"], variants)
    print(f"elapsed {out['elapsed_s']:.0f}s" + (f"; JSON: {path}" if path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
