"""Fused fp8 cast primitives, with two interchangeable backends.

Every float8 cast of a Linear operand ``t`` (2-D, row-major) is built from three primitives:

    amax_tensorwise(t)                      -> max|t| (fp32, 0-d)                         one read
    amax_rows_cols(t, rows, cols)           -> max|t| per row (M, 1) and/or column (1, K)  one read
    cast_2d(t, row_scale, col_scale, ...)   -> fp8 data, row-major (M, K) and/or its       one read,
                                               transposed copy (K, M) contiguous, and       one or two
                                               optionally max|t| measured on the way        writes

The transposed copy is what the backward GEMMs need (`_scaled_mm` takes its second operand
column-major), so each operand costs at most one amax pass plus one cast pass that writes both
layouts, and delayed scaling (known scale) costs one pass in total.

Backends (``Float8LinearConfig.cast_backend``):
  "torch":  plain torch ops. Under torch.compile inductor fuses them (and may fuse them with the
            producer of ``t``); in eager they are several kernels each.
  "triton": the hand-written Triton kernels below, registered as torch.library custom ops
            (``torch.ops.titan_fp8.*``) with fake implementations, so ``torch.compile(fullgraph=True)``
            keeps them as opaque calls. On CPU (or without Triton) the same ops run the "torch"
            reference math, so results are bit-identical across backends up to the hardware's
            fp32 -> fp8 conversion (round-to-nearest-even, saturated by our explicit clamp on both).
  "triton_inline": the same kernels registered as ``torch.library.triton_op``s
            (``torch.ops.titan_fp8.*_inline``): torch.compile traces into them and inductor launches
            the kernels from its own generated code, without the custom-op dispatch and Triton's
            Python launcher (they are still not fused with neighbouring ops).

The Triton kernels are tested on CPU with ``TRITON_INTERPRET=1`` (tests/test_float8_kernels.py). The
interpreter's own fp32 -> fp8 conversion is inexact, so there the kernels write the clamped fp32 values
and torch converts them (``_INTERPRET``); everything else (tiling, masks, transposed stores, atomics) is
the code that runs on the GPU.

Difference from the reference, by design: the Triton amax ignores NaN elements (fp32 max.f32), while
torch's amax returns NaN. NaN elements are still cast to NaN (never clamped to finite), so a NaN input
still reaches the loss and the non-finite checks.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch.library import triton_op, wrap_triton

from .scaling import float8_max, saturated_cast, tensor_amax

try:  # Triton is optional: CPU builds and machines without it use the torch reference math.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Offsets are 64-bit in the 2-D kernels; the 1-D amax kernel keeps a 32-bit loop counter.
_MAX_AMAX_NUMEL = 2**31 - 2**27


def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or _INTERPRET)


# ---------------------------------------------------------------------------------------------- kernels

if HAVE_TRITON:

    @triton.jit
    def _amax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # Grid-stride loop: a few hundred programs, one atomic each.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        tl.atomic_max(out_ptr, tl.max(acc, axis=0))

    @triton.jit
    def _amax_rows_cols_kernel(
        x_ptr, row_ptr, col_ptr, M, K,
        ROWS: tl.constexpr, COLS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):
        offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        offs_k = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)
        mask_m = offs_m < M
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        a = tl.abs(x.to(tl.float32))
        if ROWS:
            tl.atomic_max(row_ptr + offs_m, tl.max(a, axis=1), mask=mask_m)
        if COLS:
            tl.atomic_max(col_ptr + offs_k, tl.max(a, axis=0), mask=mask_k)

    @triton.jit
    def _cast_2d_kernel(
        x_ptr, row_scale_ptr, col_scale_ptr, out_ptr, out_t_ptr, amax_ptr, M, K,
        FP8_MAX: tl.constexpr, ROWWISE: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr,
        WITH_AMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    ):
        # One (BM, BK) tile of x: scaled, clamped, converted, stored row-major into out (M, K) and
        # transposed into out_t (K, M) (the compiler stages the transposed store through shared memory
        # so both stores are coalesced).
        offs_m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        offs_k = (tl.program_id(1) * BK + tl.arange(0, BK)).to(tl.int64)
        mask_m = offs_m < M
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if WRITE_ROW:
            if ROWWISE:
                y = x * tl.load(row_scale_ptr + offs_m, mask=mask_m, other=1.0)[:, None]
            else:
                y = x * tl.load(row_scale_ptr)
            clamped = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
            y = tl.where(y != y, y, clamped)  # NaN stays NaN (min/max alone would drop it)
            tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_COL:
            if ROWWISE:
                y_t = x * tl.load(col_scale_ptr + offs_k, mask=mask_k, other=1.0)[None, :]
            else:
                y_t = x * tl.load(row_scale_ptr)
            clamped_t = tl.minimum(tl.maximum(y_t, -FP8_MAX), FP8_MAX)
            y_t = tl.where(y_t != y_t, y_t, clamped_t)
            tl.store(out_t_ptr + offs_k[None, :] * M + offs_m[:, None], y_t.to(out_t_ptr.dtype.element_ty),
                     mask=mask)
        if WITH_AMAX:
            tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))

    _AUTOTUNE_2D = [
        triton.Config({"BM": 64, "BK": 128}, num_warps=4),
        triton.Config({"BM": 128, "BK": 64}, num_warps=4),
        triton.Config({"BM": 128, "BK": 128}, num_warps=8),
        triton.Config({"BM": 64, "BK": 64}, num_warps=4),
    ]
    # Bigger tiles mean fewer atomics for the per-row/per-column maxima.
    _AUTOTUNE_AMAX_2D = _AUTOTUNE_2D + [triton.Config({"BM": 64, "BK": 256}, num_warps=8)]
    # (With M, K multiples of 16 and 16-byte aligned tensors, as Triton specialises them at launch, both
    # stores, including the transposed one, are 16-byte vector stores; checked on sm_90 PTX.)
    _cast_2d_tuned = triton.autotune(configs=_AUTOTUNE_2D, key=["M", "K", "ROWWISE", "WRITE_ROW", "WRITE_COL"])(
        _cast_2d_kernel
    )
    @triton.jit
    def _cast_many_kernel(
        src_ptrs, out_ptr, out_offsets, numels, scale_ptr, block_tensor, block_first,
        FP8_MAX: tl.constexpr, SRC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One BLOCK of one of many tensors: program -> (tensor t, block within t) from two small tables, t's
        # address from a pointer table (the tensors are separate allocations), t's own tensorwise scale.
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        n = tl.load(numels + t)
        src = tl.load(src_ptrs + t).to(tl.pointer_type(SRC))
        out = out_ptr + tl.load(out_offsets + t)
        offs = (pid - tl.load(block_first + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.load(scale_ptr + t)
        clamped = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        y = tl.where(y != y, y, clamped)
        tl.store(out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    _amax_rows_cols_tuned = triton.autotune(configs=_AUTOTUNE_AMAX_2D, key=["M", "K", "ROWS", "COLS"])(
        _amax_rows_cols_kernel
    )


def _grid_2d(m: int, k: int):
    return lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(k, meta["BK"]))


# ---------------------------------------------------------------------------------------------- launchers


# `inline=True` launches through `wrap_triton`, for the `triton_op` registrations below ("triton_inline"):
# torch.compile traces into them and inductor launches the kernels from its generated code.


def _launch(kernel, inline: bool):
    return wrap_triton(kernel) if inline else kernel


def _unused_pointer(alias: torch.Tensor, inline: bool) -> torch.Tensor:
    """What to pass for a pointer the kernel ignores: a real allocation (never a 0-size tensor). Eager, any
    tensor of the right dtype (``alias``, no allocation). Inlined, its own 1-element scratch tensor: an argument
    aliasing a written one makes functionalization copy buffers back around the kernel."""
    return torch.empty(1, dtype=alias.dtype, device=alias.device) if inline else alias


def triton_amax(x: torch.Tensor, inline: bool = False) -> torch.Tensor:
    x = x.contiguous().view(-1)
    out = torch.zeros((), dtype=torch.float32, device=x.device)
    n = x.numel()
    if n:
        block = 4096
        grid = (min(triton.cdiv(n, block), 1024),)
        _launch(_amax_kernel, inline)[grid](x, out, n, BLOCK=block, num_warps=8)
    return out


def triton_amax_rows_cols(x: torch.Tensor, rows: bool, cols: bool, inline: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    m, k = x.shape
    row = torch.zeros(m if rows else 0, dtype=torch.float32, device=x.device)
    col = torch.zeros(k if cols else 0, dtype=torch.float32, device=x.device)
    if x.numel() and (rows or cols):
        args = (x, row if rows else _unused_pointer(col, inline), col if cols else _unused_pointer(row, inline), m, k)
        if _INTERPRET:
            _launch(_amax_rows_cols_kernel, inline)[(triton.cdiv(m, 32), triton.cdiv(k, 32))](
                *args, ROWS=rows, COLS=cols, BM=32, BK=32)
        else:
            _launch(_amax_rows_cols_tuned, inline)[_grid_2d(m, k)](*args, ROWS=rows, COLS=cols)
    return row.view(-1, 1), col.view(1, -1)


def triton_cast_2d(
    x: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    float8_dtype: torch.dtype,
    rowwise: bool,
    write_row: bool,
    write_col: bool,
    with_amax: bool,
    inline: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    m, k = x.shape
    # The interpreter converts fp32 -> fp8 inexactly: let it write fp32, convert with torch below.
    store_dtype = torch.float32 if _INTERPRET else float8_dtype
    out = torch.empty((m, k) if write_row else (0,), dtype=store_dtype, device=x.device)
    out_t = torch.empty((k, m) if write_col else (0,), dtype=store_dtype, device=x.device)
    amax = torch.zeros((), dtype=torch.float32, device=x.device) if with_amax else x.new_empty((0,), dtype=torch.float32)
    if x.numel():
        rs = row_scale.reshape(-1).to(torch.float32).contiguous()
        cs = col_scale.reshape(-1).to(torch.float32).contiguous()
        rs, cs = (rs if rs.numel() else cs), (cs if cs.numel() else rs)  # read-only: aliasing is harmless
        args = (x, rs, cs, out if write_row else _unused_pointer(out_t, inline),
                out_t if write_col else _unused_pointer(out, inline), amax if with_amax else _unused_pointer(rs, inline),
                m, k)
        flags = dict(FP8_MAX=float8_max(float8_dtype), ROWWISE=rowwise, WRITE_ROW=write_row, WRITE_COL=write_col,
                     WITH_AMAX=with_amax)
        if _INTERPRET:
            _launch(_cast_2d_kernel, inline)[(triton.cdiv(m, 32), triton.cdiv(k, 32))](*args, **flags, BM=32, BK=32)
        else:
            _launch(_cast_2d_tuned, inline)[_grid_2d(m, k)](*args, **flags)
    if _INTERPRET:
        out, out_t = out.to(float8_dtype), out_t.to(float8_dtype)
    return out, out_t, amax


_CAST_MANY_BLOCK = 4096
# Per list of source tensors (their addresses and sizes, which FSDP keeps fixed for a run): the device tables
# the kernel reads, built once, so that a step's batched cast is one allocation and one launch.
_cast_many_tables: dict = {}


class _CastManyTable(NamedTuple):
    src_ptrs: torch.Tensor  # int64 (n,): each tensor's address
    out_offsets: torch.Tensor  # int64 (n,): where each tensor starts in the flat output
    numels: torch.Tensor  # int64 (n,)
    block_tensor: torch.Tensor  # int32 (blocks,): the tensor each program casts ...
    block_first: torch.Tensor  # int32 (n,): ... and the first program of each tensor
    offsets: list[int]  # out_offsets on the host, to cut the output into views
    total: int  # elements of the flat output
    n_blocks: int  # programs to launch


def _cast_many_table(tensors: list[torch.Tensor]) -> _CastManyTable:
    key = (tensors[0].device, tuple((t.data_ptr(), t.numel()) for t in tensors))
    table = _cast_many_tables.get(key)
    if table is None:
        numels = [t.numel() for t in tensors]
        blocks = [-(-n // _CAST_MANY_BLOCK) for n in numels]
        # Each tensor starts 16-element aligned in the flat output (16-byte aligned fp8 views).
        offsets, total = [], 0
        for n in numels:
            offsets.append(total)
            total += -(-n // 16) * 16
        first, acc = [], 0
        for b in blocks:
            first.append(acc)
            acc += b
        as_device = lambda values, dtype: torch.tensor(values, dtype=dtype).to(tensors[0].device)
        table = _CastManyTable(
            as_device([t.data_ptr() for t in tensors], torch.int64),
            as_device(offsets, torch.int64),
            as_device(numels, torch.int64),
            torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), torch.tensor(blocks)).to(tensors[0].device),
            as_device(first, torch.int32),
            offsets,
            total,
            acc,
        )
        if len(_cast_many_tables) >= 8:  # a new model or a re-sharded one; drop stale tables
            _cast_many_tables.clear()
        _cast_many_tables[key] = table
    return table


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def triton_cast_many(tensors: list[torch.Tensor], scales: torch.Tensor, float8_dtype: torch.dtype) -> list[torch.Tensor]:
    """All ``tensors`` (one source dtype, contiguous) cast with ``scales[i]`` in one launch."""
    table = _cast_many_table(tensors)
    # The interpreter converts fp32 -> fp8 inexactly: let it write fp32, convert with torch below.
    flat = torch.empty(table.total, dtype=torch.float32 if _INTERPRET else float8_dtype, device=tensors[0].device)
    if table.n_blocks:
        _cast_many_kernel[(table.n_blocks,)](
            table.src_ptrs, flat, table.out_offsets, table.numels, scales.to(torch.float32).contiguous(),
            table.block_tensor, table.block_first,
            FP8_MAX=float8_max(float8_dtype), SRC=getattr(tl, _TL_DTYPES[tensors[0].dtype]), BLOCK=_CAST_MANY_BLOCK,
            num_warps=8,
        )
    if _INTERPRET:
        flat = flat.to(float8_dtype)
    return [flat[o: o + t.numel()].view(t.shape) for t, o in zip(tensors, table.offsets)]


def cast_many_to_float8(tensors: list[torch.Tensor], scales: torch.Tensor, float8_dtype: torch.dtype) -> list[torch.Tensor]:
    """``saturated_cast(tensors[i], scales[i])`` for every i: each tensor with its own tensorwise scale (a 1-D
    ``scales``), the results (same shapes, fp8) views of one flat buffer.

    On CUDA one Triton launch per source dtype instead of four eager kernels per tensor (FSDP2 casts every
    weight shard before its all-gather: ~450 tensors a step for Llama3-8B); bit-identical to the reference.
    """
    if len(tensors) != scales.numel():
        raise ValueError(f"cast_many_to_float8: {len(tensors)} tensors but {scales.numel()} scales")
    if not tensors:
        return []
    scales = scales.reshape(-1)
    out: list[Optional[torch.Tensor]] = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        fast = _use_triton(t) and t.is_contiguous() and t.dtype in _TL_DTYPES
        groups.setdefault((t.device, t.dtype) if fast else None, []).append(i)
    for key, idx in groups.items():
        if key is None:
            for i in idx:
                out[i] = saturated_cast(tensors[i], scales[i], float8_dtype)
            continue
        # (A stack of 0-d views, not indexing with a list: that would copy the list to the GPU from pageable
        # memory and stall the CPU on the GPU's queue.)
        group_scales = scales if len(idx) == len(tensors) else torch.stack([scales[i] for i in idx])
        for i, data in zip(idx, triton_cast_many([tensors[i] for i in idx], group_scales, float8_dtype)):
            out[i] = data
    return out


# ---------------------------------------------------------------------------------------------- torch reference


def torch_amax_rows_cols(x: torch.Tensor, rows: bool, cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    row = tensor_amax(x, 1) if rows else x.new_zeros((0, 1), dtype=torch.float32)
    col = tensor_amax(x, 0) if cols else x.new_zeros((1, 0), dtype=torch.float32)
    return row, col


def torch_cast_2d(
    x: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    float8_dtype: torch.dtype,
    rowwise: bool,
    write_row: bool,
    write_col: bool,
    with_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same math as ``_cast_2d_kernel`` in torch ops (inductor fuses them under torch.compile)."""
    col = col_scale if rowwise else row_scale
    out = saturated_cast(x, row_scale, float8_dtype) if write_row else x.new_empty((0,), dtype=float8_dtype)
    # The transposed copy casts x.t() rather than transposing the row-major cast: the same values, but not the
    # same graph as the forward's cast, so that under torch.compile common-subexpression elimination does not
    # merge the backward's recast into the forward's fp8 tensor. Merged, the partitioner saved that fp8 tensor
    # whenever it refuses to recompute the forward cast ("used far apart": with delayed scaling wq/wk/wv cast
    # one input with three scale buffers), +192 MiB per Llama3-8B layer at 16384 tokens, where recomputing
    # from the bf16 tensor the backward keeps anyway costs nothing.
    out_t = (saturated_cast(x.t(), col.t() if col.dim() else col, float8_dtype).contiguous() if write_col
             else x.new_empty((0,), dtype=float8_dtype))
    amax = tensor_amax(x) if with_amax else x.new_zeros((0,), dtype=torch.float32)
    return out, out_t, amax


# ---------------------------------------------------------------------------------------------- custom ops


# Each op twice. "triton": a torch.library.custom_op, opaque to torch.compile (inductor calls it like an eager
# op: custom-op dispatch + Triton's Python launcher, ~0.1 ms of CPU per call). "triton_inline": a
# torch.library.triton_op, which torch.compile traces into, so inductor launches the kernel from its generated
# code (the function is also its fake implementation). Inlined, the compiled per-Linear step needs far less CPU,
# but the partitioner then places the casts around the kernels differently, which cost 8B layers end to end
# more GPU time than it saved (docs/performance.md, session 14); "triton" stays the recipes' default.


def _amax_impl(x: torch.Tensor, inline: bool) -> torch.Tensor:
    if _use_triton(x) and x.numel() < _MAX_AMAX_NUMEL:
        return triton_amax(x, inline)
    return tensor_amax(x)


def _amax_rows_cols_impl(x: torch.Tensor, rows: bool, cols: bool, inline: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return triton_amax_rows_cols(x, rows, cols, inline)
    return torch_amax_rows_cols(x, rows, cols)


def _cast_2d_impl(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax, inline):
    if _use_triton(x):
        return triton_cast_2d(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax, inline)
    return torch_cast_2d(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax)


@torch.library.custom_op("titan_fp8::amax", mutates_args=())
def _amax_op(x: torch.Tensor) -> torch.Tensor:
    return _amax_impl(x, False)


@_amax_op.register_fake
def _(x):
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("titan_fp8::amax_rows_cols", mutates_args=())
def _amax_rows_cols_op(x: torch.Tensor, rows: bool, cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _amax_rows_cols_impl(x, rows, cols, False)


@_amax_rows_cols_op.register_fake
def _(x, rows, cols):
    m, k = x.shape
    return x.new_empty((m if rows else 0, 1), dtype=torch.float32), x.new_empty((1, k if cols else 0), dtype=torch.float32)


@torch.library.custom_op("titan_fp8::cast_2d", mutates_args=())
def _cast_2d_op(
    x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, float8_dtype: torch.dtype, rowwise: bool,
    write_row: bool, write_col: bool, with_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cast_2d_impl(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax, False)


@_cast_2d_op.register_fake
def _(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax):
    m, k = x.shape
    out = x.new_empty((m, k) if write_row else (0,), dtype=float8_dtype)
    out_t = x.new_empty((k, m) if write_col else (0,), dtype=float8_dtype)
    amax = x.new_empty(() if with_amax else (0,), dtype=torch.float32)
    return out, out_t, amax


@triton_op("titan_fp8::amax_inline", mutates_args=())
def _amax_inline_op(x: torch.Tensor) -> torch.Tensor:
    return _amax_impl(x, True)


@triton_op("titan_fp8::amax_rows_cols_inline", mutates_args=())
def _amax_rows_cols_inline_op(x: torch.Tensor, rows: bool, cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _amax_rows_cols_impl(x, rows, cols, True)


@triton_op("titan_fp8::cast_2d_inline", mutates_args=())
def _cast_2d_inline_op(
    x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, float8_dtype: torch.dtype, rowwise: bool,
    write_row: bool, write_col: bool, with_amax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cast_2d_impl(x, row_scale, col_scale, float8_dtype, rowwise, write_row, write_col, with_amax, True)


_OPS = {  # backend -> (amax, amax_rows_cols, cast_2d)
    "triton": (torch.ops.titan_fp8.amax, torch.ops.titan_fp8.amax_rows_cols, torch.ops.titan_fp8.cast_2d),
    "triton_inline": (torch.ops.titan_fp8.amax_inline, torch.ops.titan_fp8.amax_rows_cols_inline,
                      torch.ops.titan_fp8.cast_2d_inline),
}


# ---------------------------------------------------------------------------------------------- dispatch


def amax_tensorwise(x: torch.Tensor, backend: str) -> torch.Tensor:
    """max|x| as a 0-d fp32 tensor."""
    if backend in _OPS:
        return _OPS[backend][0](x)
    return tensor_amax(x)


def amax_rows_cols(
    x: torch.Tensor, rows: bool, cols: bool, backend: str
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """max|x| per row (M, 1) and/or per column (1, K) of a 2-D x, in one pass (triton backend)."""
    if backend in _OPS:
        row, col = _OPS[backend][1](x, rows, cols)
    else:
        row, col = torch_amax_rows_cols(x, rows, cols)
    return (row if rows else None), (col if cols else None)


def cast_2d(
    x: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    float8_dtype: torch.dtype,
    *,
    write_row: bool,
    write_col: bool,
    with_amax: bool,
    backend: str,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Cast a 2-D ``x`` to fp8 in one pass: the row-major data and/or its transposed copy (K, M).

    Tensorwise: ``row_scale`` is the 0-d scale of both outputs and ``col_scale`` is None.
    Rowwise: ``row_scale`` (M, 1) scales the row-major data, ``col_scale`` (1, K) the transposed copy
    (either may be None when its output is not written).
    ``with_amax`` also returns max|x| (0-d): delayed scaling's single pass."""
    rowwise = row_scale is None or row_scale.dim() > 0
    dummy = x.new_empty((0,), dtype=torch.float32)
    row = row_scale if row_scale is not None else dummy
    col = (col_scale if col_scale is not None else dummy) if rowwise else row
    if backend in _OPS:
        out, out_t, amax = _OPS[backend][2](x, row, col, float8_dtype, rowwise, write_row, write_col, with_amax)
    else:
        out, out_t, amax = torch_cast_2d(x, row, col, float8_dtype, rowwise, write_row, write_col, with_amax)
    return (out if write_row else None), (out_t if write_col else None), (amax if with_amax else None)
