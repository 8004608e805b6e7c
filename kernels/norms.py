"""Norms of many tensors, and in-place scaling, as Triton launches.

Two levels, deterministic for a given layout (no float atomics):
``_partials_kernel`` gives every chunk a partial (sum of |x|^p, max |x| for
p = inf) and ``_combine_kernel`` sums (or maxes) each tensor's partials in
chunk order; every sum in fp64, each term in the math precision (it overflows
and underflows as torch's does). The same scheme as csrc/cpu/norms.cpp and
csrc/cuda/norms.cu. NaN anywhere makes the tensor's result NaN.
General p uses exp(p * log|x|) in fp64 (fp32 exp and log compile to approximate instructions).
"""
import triton
import triton.language as tl

from ._numeric import EXACT, F64, f64, f64_bits, load_math, store_math, to_math
from ._table import chunk_block, program_chunk

L1 = tl.constexpr(0)
L2 = tl.constexpr(1)
INF = tl.constexpr(2)
GENERAL = tl.constexpr(3)


def norm_kind(p: float) -> int:
    """The reduction a norm order needs (the same codes as NormKind in norms.h)."""
    return {1.0: 0, 2.0: 1, float("inf"): 2}.get(float(p), 3)


@triton.jit(do_not_specialize=["p"])
def _partials_kernel(table, numels, chunk_tensor, chunk_start, p: tl.int64, partials,
                     KIND: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, numels, CHUNK, False)
    addr = tl.load(table + t)
    ACC: tl.constexpr = tl.float64 if KIND == F64 else tl.float32  # the terms' precision
    acc = tl.zeros([BLOCK], tl.float64)  # sums in fp64, as csrc/cpu/norms.cpp
    nans = tl.zeros([BLOCK], tl.int32)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        x = load_math(addr, offs, mask, KIND)  # masked lanes read 0: they add nothing
        a = tl.abs(x)
        nans += (x != x).to(tl.int32)
        if NORM == INF:
            acc = tl.maximum(acc, a.to(tl.float64))
        elif NORM == L2:
            acc += (x * x).to(tl.float64)
        elif NORM == GENERAL:
            # |x|^p as exp(p log|x|) in fp64: fp32 tl.exp / tl.log compile to approximate
            # instructions (ex2.approx, lg2.approx); fp64 ones go through libdevice, exact to an ulp
            # p rounded to the math precision first, as the C++ (T(p)) and torch's pow take it
            acc += tl.exp(to_math(f64(p), KIND).to(tl.float64) * tl.log(a.to(tl.float64))).to(ACC).to(tl.float64)
        else:
            acc += a.to(tl.float64)
    if NORM == INF:
        r = tl.max(acc, axis=0)
    else:
        r = tl.sum(acc, axis=0)
    r = tl.where(tl.sum(nans, axis=0) > 0, float("nan"), r)
    tl.store(partials + tl.program_id(0), r)


@triton.jit
def _combine_kernel(partials, chunk_first, out, IS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    lo = tl.load(chunk_first + t)
    hi = tl.load(chunk_first + t + 1)
    acc = tl.zeros([BLOCK], tl.float64)
    nans = tl.zeros([BLOCK], tl.int32)
    for i in range(lo, hi, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        v = tl.load(partials + idx, mask=idx < hi, other=0.0)
        nans += (v != v).to(tl.int32)
        if IS_MAX:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    if IS_MAX:
        r = tl.max(acc, axis=0)
    else:
        r = tl.sum(acc, axis=0)
    tl.store(out + t, tl.where(tl.sum(nans, axis=0) > 0, float("nan"), r))


@triton.jit
def _scale_kernel(table, numels, chunk_tensor, chunk_start, factor_ptr,
                  KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, numels, CHUNK, False)
    addr = tl.load(table + t)
    factor = tl.load(factor_ptr)  # fp64
    if KIND != F64:
        factor = factor.to(tl.float32)  # rounded once to the math precision, as csrc/cpu/norms.cpp
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        x = load_math(addr, offs, mask, KIND)
        store_math(addr, offs, x * factor, mask, KIND)


def launch_power_sums(tables, out, *, kind, p, block, num_warps):
    """Per-tensor sum of |x|^p (max |x| for p = inf) of the tables' row 0 into
    `out` (fp64, one value per tensor)."""
    import torch

    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=out.device)
    norm = norm_kind(p)
    _partials_kernel[(tables.n_chunks,)](table=tables.table, numels=tables.numel, chunk_tensor=tables.chunk_tensor,
                                         chunk_start=tables.chunk_start, p=f64_bits(p), partials=partials, KIND=kind,
                                         NORM=norm, CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT)
    _combine_kernel[(tables.n_tensors,)](partials=partials, chunk_first=tables.chunk_first, out=out,
                                         IS_MAX=norm == 2, BLOCK=256, num_warps=num_warps, **EXACT)


def launch_scale(tables, factor, *, kind, block, num_warps):
    """x *= factor (1-element fp64 tensor, rounded to the math precision) for the tables' row 0."""
    _scale_kernel[(tables.n_chunks,)](table=tables.table, numels=tables.numel, chunk_tensor=tables.chunk_tensor,
                                      chunk_start=tables.chunk_start, factor_ptr=factor, KIND=kind,
                                      CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT)
