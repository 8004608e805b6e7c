"""Scaled FP8 casts (e4m3fn, e5m2) of many tensors as one Triton launch, with
each tensor's absmax, and the fp32 -> fp8 rounding they share with the
optimizer kernels.

The conversion is csrc/include/fusedopt/fp8.h's, in integer operations on the
fp32 bits: the Triton interpreter mis-converts to fp8 with ``.to``, and the
explicit form gives the same bits on every device (round to nearest even;
NaN -> 0x7F with the sign; the caller clamps to +-max first, as torch's
``(x * s).clamp(-max, max).to(dtype)`` does).
"""
import triton
import triton.language as tl

from ._numeric import EXACT, load_math
from ._table import chunk_block, program_chunk, table_args
from .norms import _combine_kernel

E4M3FN = tl.constexpr(0)
E5M2 = tl.constexpr(1)
ROW_INPUT = tl.constexpr(0)
ROW_OUTPUT = tl.constexpr(1)


@triton.jit
def fp8_bits(x, MANT: tl.constexpr, BIAS: tl.constexpr):
    """fp32 `x` (|x| <= the format's max, or NaN) -> the fp8 bit pattern (int32).
    The rule of csrc/include/fusedopt/fp8.h: adding C, the power of two whose fp32
    ulp is fp8's ulp at |x| (or the subnormal ulp), rounds |x| to fp8's grid in
    the FPU; the bits of the sum minus C's count fp8 ulps."""
    u = x.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    SUBNORMAL_C: tl.constexpr = (127 + 24 - BIAS - MANT) << 23
    c = (a & 0x7F800000) + ((23 - MANT) << 23)
    c = tl.maximum(c, tl.full(x.shape, SUBNORMAL_C, tl.uint32))
    total = (a.to(tl.float32, bitcast=True) + c.to(tl.float32, bitcast=True)).to(tl.uint32, bitcast=True)
    r = total - c + (c >> (23 - MANT)) - ((151 - MANT - BIAS) << MANT)
    r = tl.where(a > 0x7F800000, 0x7F, r)  # NaN
    return ((r & 0xFF) | ((u >> 24) & 0x80)).to(tl.int32)


@triton.jit
def cast_fp8(x, scale, FORMAT: tl.constexpr):
    """saturate(x * scale) in the format, as int32 bit patterns (x in fp32)."""
    if FORMAT == E4M3FN:
        y = x * scale
        y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))  # NaN stays NaN
        bits = fp8_bits(y, 3, 7)
    else:
        y = x * scale
        y = tl.where(y > 57344.0, 57344.0, tl.where(y < -57344.0, -57344.0, y))
        bits = fp8_bits(y, 2, 15)
    return bits


@triton.jit
def _cast_kernel(table, numels, chunk_tensor, chunk_start, n_tensors, scales, partials,
                 KIND: tl.constexpr, FORMAT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end = program_chunk(chunk_tensor, chunk_start, numels, numels, CHUNK, False)
    src = tl.load(table + ROW_INPUT * n_tensors + t)
    dst = tl.load(table + ROW_OUTPUT * n_tensors + t).to(tl.pointer_type(tl.int8))
    scale = tl.load(scales + t)
    acc = tl.zeros([BLOCK], tl.float32)
    nans = tl.zeros([BLOCK], tl.int32)
    for off in range(0, end, BLOCK):
        offs, mask = chunk_block(start, off, end, BLOCK)
        x = load_math(src, offs, mask, KIND)  # masked lanes read 0: no effect on the max
        tl.store(dst + offs, cast_fp8(x, scale, FORMAT).to(tl.int8), mask=mask)
        acc = tl.maximum(acc, tl.abs(x))
        nans += (x != x).to(tl.int32)
    r = tl.max(acc, axis=0).to(tl.float64)
    tl.store(partials + tl.program_id(0), tl.where(tl.sum(nans, axis=0) > 0, float("nan"), r))


def launch_cast(tables, scales, amax, *, kind, fmt, block, num_warps):
    """Row 1 = saturate(row 0 * scales[t]) in fp8 format `fmt` (0 e4m3fn, 1
    e5m2); each row-0 tensor's absmax into `amax` (fp64)."""
    import torch

    partials = torch.empty(tables.n_chunks, dtype=torch.float64, device=amax.device)
    _cast_kernel[(tables.n_chunks,)](**table_args(tables), scales=scales, partials=partials, KIND=kind, FORMAT=fmt,
                                     CHUNK=tables.chunk_size, BLOCK=block, num_warps=num_warps, **EXACT)
    _combine_kernel[(tables.n_tensors,)](partials=partials, chunk_first=tables.chunk_first, out=amax, IS_MAX=True,
                                         BLOCK=256, num_warps=num_warps, **EXACT)
