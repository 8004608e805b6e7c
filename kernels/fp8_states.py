"""Block-scaled FP8 optimizer states in Triton: the operations of
csrc/include/fusedopt/fp8_states.h (spec: fusedopt/reference/fp8_states.py).

A state is e4m3fn values plus one fp32 scale per QBLOCK = 256 elements,
recomputed from the block's absmax at every store; the second moments hold
sqrt(v). A kernel's BLOCK is a multiple of QBLOCK and its chunks start at
multiples of it, so each block of the state lies inside one loop iteration:
the absmax is a reduction over one axis of the [BLOCK // QBLOCK, QBLOCK] view.
All conversions are integer operations on the bits (the interpreter
mis-converts fp8 with ``.to``), the same on every device.
"""
import triton
import triton.language as tl

from ._numeric import F64, FP8_BLOCKED, as_stored, div_ieee, load_state, sqrt_ieee, store_math
from .fp8 import E4M3FN, cast_fp8

QBLOCK = tl.constexpr(256)


@triton.jit
def e4m3fn_to_float(bits):
    """e4m3fn bit patterns (int32, 0..255) -> fp32, exact."""
    mag = bits & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    subnormal = (mag & 7).to(tl.float32) * 0.001953125
    x = tl.where((mag >> 3) == 0, subnormal, normal)
    x = tl.where(mag == 0x7F, float("nan"), x)
    return tl.where((bits & 0x80) != 0, -x, x)


@triton.jit
def load_fp8_state(addr, scale_addr, offs, mask, SQRT: tl.constexpr):
    """Decode elements `offs` of a state (fp32; v = s * s when SQRT). Masked lanes read 0."""
    q = tl.load(addr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scale_addr.to(tl.pointer_type(tl.float32)) + offs // QBLOCK, mask=mask, other=0.0)
    s = e4m3fn_to_float(q) * scale
    if SQRT:
        s = s * s
    return s


@triton.jit
def store_fp8_state(addr, scale_addr, offs, x, mask, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """Encode fp32 values `x` (sqrt(x) when SQRT) at `offs` (BLOCK of them,
    offs[0] a multiple of QBLOCK) with fresh per-block scales. Returns what a
    later load_fp8_state of them gives (fp32)."""
    NB: tl.constexpr = BLOCK // QBLOCK
    x = x.to(tl.float32)
    if SQRT:
        x = sqrt_ieee(x, 0)
    # |x| as bits: an integer max is the absmax, of the finite values only (fp8_states.h: q8_abs_bits)
    a = tl.where(mask, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    finite = a < 0x7F800000
    a = tl.where(finite, a, 0)
    amax = tl.max(tl.reshape(a, (NB, QBLOCK)), axis=1).to(tl.float32, bitcast=True)
    scale = div_ieee(amax, tl.full(amax.shape, 448.0, tl.float32), 0)
    inv = div_ieee(tl.full(amax.shape, 448.0, tl.float32), amax, 0)
    inv = tl.where(inv < 3.4028234663852886e38, inv, 3.4028234663852886e38)  # FLT_MAX: tiny amax overflows
    inv = tl.where(amax > 0, inv, 0.0)
    first = offs // QBLOCK
    block_first = tl.max(tl.reshape(first, (NB, QBLOCK)), axis=1)  # every lane of a block has the same index
    block_live = tl.max(tl.reshape(mask.to(tl.int32), (NB, QBLOCK)), axis=1) > 0
    tl.store(scale_addr.to(tl.pointer_type(tl.float32)) + block_first, scale, mask=block_live)
    # each element's block's values by a gather along x's own layout (a
    # reshape/broadcast back from [NB, 1] gave triton 3.6 a layout replicated
    # across threads: FusedLAMB's FP8 moments kernel took minutes to compile)
    block = tl.arange(0, BLOCK) // QBLOCK
    bits = tl.where(finite, cast_fp8(x, tl.gather(inv, block, 0), E4M3FN), 0x7F)  # inf and NaN: NaN
    tl.store(addr.to(tl.pointer_type(tl.int8)) + offs, bits.to(tl.int8), mask=mask)
    stored = e4m3fn_to_float(bits & 0xFF) * tl.gather(scale, block, 0)
    if SQRT:
        stored = stored * stored
    return stored


@triton.jit
def load_any_state(addr, scales, offs, mask, SQRT: tl.constexpr, S_KIND: tl.constexpr, P_KIND: tl.constexpr):
    """A state in the math precision of P_KIND params: decoded when stored as
    block-scaled FP8 (S_KIND == FP8_BLOCKED, `scales` its scales), else
    widened from S_KIND (`scales` unused)."""
    if S_KIND == FP8_BLOCKED:
        x = load_fp8_state(addr, scales, offs, mask, SQRT)
        if P_KIND == F64:
            x = x.to(tl.float64)
    else:
        x = load_state(addr, offs, mask, S_KIND, P_KIND)
    return x


@triton.jit
def store_any_state(addr, scales, offs, x, mask, SQRT: tl.constexpr, S_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Store a state's new values `x`; returns what load_any_state will read
    back (in x's dtype): rounded to S_KIND, or encoded as FP8."""
    if S_KIND == FP8_BLOCKED:
        y = store_fp8_state(addr, scales, offs, x, mask, SQRT, BLOCK).to(x.dtype)
    else:
        store_math(addr, offs, x, mask, S_KIND)
        y = as_stored(x, S_KIND)
    return y
