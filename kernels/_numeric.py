"""Loads and stores by storage dtype, and the rounding helpers they need.

bf16 goes through int16 bit patterns with explicit round-to-nearest-even
integer arithmetic: the Triton interpreter truncates on ``.to(tl.bfloat16)``
while GPUs round, and the explicit form gives the same bits on both (and is the
same formula as csrc/include/fusedopt/numeric.h). fp16 conversion is correct on
both, so it uses ``.to``.
"""
import struct

import triton
import triton.language as tl

# Storage dtype codes, the same numbers as fusedopt.backends._dtypes and
# csrc/include/fusedopt/common.h.
F32 = tl.constexpr(0)
F64 = tl.constexpr(1)
BF16 = tl.constexpr(2)
F16 = tl.constexpr(3)
FP8_BLOCKED = tl.constexpr(4)  # block-scaled e4m3fn states (kernels/fp8_states.py)

#: Options of every launch: no floating-point contraction. The kernels round
#: each operation as torch and the reference do, with an explicit tl.fma where
#: those fuse; Triton's default on GPUs would contract other multiply-adds into
#: FMAs too (sm_90: 45 instead of 24 in the AdamW kernel) and change the bits.
#: The interpreter never contracts, so without this the CPU tests would not
#: test what a GPU runs. (The CUDA backend builds with --fmad=false likewise.)
EXACT = {"enable_fp_fusion": False}


def f64_bits(x) -> int:
    """Host float `x` as the int64 bit pattern of its fp64 value: how launches
    pass hyperparameters. A Python float argument reaches a GPU kernel as fp32
    but stays a Python float under the interpreter (rounded to fp32 where it
    meets a tensor), so fp64 params would get fp32-rounded hyperparameters and
    the two would round scalar expressions differently. With the bits, the
    kernels form their per-step scalars in fp64 and round them once to the
    math precision (`to_math`), as the C++ headers do, on a GPU and under the
    interpreter alike. Kernel parameters that take them are annotated
    ``tl.int64`` and listed in ``do_not_specialize``: the JIT would otherwise
    compile a variant for bits that are a multiple of 16."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def f64(bits):
    """The fp64 value of a scalar argument passed as f64_bits."""
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def to_math(x, P_KIND: tl.constexpr):
    """fp64 scalar `x` rounded once to the math precision of P_KIND params
    (fp64 for fp64 params, fp32 otherwise)."""
    if P_KIND == F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def lr_and_decay(lr, lr_ptr, weight_decay, P_KIND: tl.constexpr, LR_IS_PTR: tl.constexpr):
    """(lr in fp64, the decay factor 1 - lr * weight_decay rounded once to the
    math precision): lr from the fp32 tensor at lr_ptr when LR_IS_PTR, else
    from its f64_bits, as the C++ headers form them."""
    if LR_IS_PTR:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = f64(lr)
    return lr64, to_math(1.0 - lr64 * f64(weight_decay), P_KIND)


@triton.jit
def bf16_bits_rne(x):
    """fp32 -> bf16 bit pattern (int16), round-to-nearest-even; NaN -> 0x7FC0."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit
def load_joined(param, rem, offs, mask):
    """The fp32 masters of bf16 params from their int16 remainders
    (master_weights="remainder": csrc/include/fusedopt/numeric.h's
    join_remainder; fusedopt/reference/remainder.py proves the encoding)."""
    bits = tl.load(param.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0).to(tl.int32)
    low = tl.load(rem.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0).to(tl.int32)
    upper = (bits - (low < 0).to(tl.int32)) & 0xFFFF
    return ((upper << 16) | (low & 0xFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def store_split(param, rem, offs, x, mask):
    """Store fp32 masters `x` as bf16 params and int16 remainders (split_remainder in numeric.h)."""
    b = x.to(tl.int32, bitcast=True)
    low = b & 0xFFFF
    upper = (b >> 16) + (low >> 15)  # (arithmetic shift: in int16 range but for NaN patterns, replaced)
    upper = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, upper)
    tl.store(param.to(tl.pointer_type(tl.int16)) + offs, upper.to(tl.int16), mask=mask)
    tl.store(rem.to(tl.pointer_type(tl.int16)) + offs, tl.where(low >= 0x8000, low - 0x10000, low).to(tl.int16),
             mask=mask)


@triton.jit
def load_weight(param, work, offs, mask, W_KIND: tl.constexpr, REM: tl.constexpr):
    """A block of weights in the math precision: from `work` (the param, or
    its fp32 master: W_KIND), or with REM the fp32 master joined from the bf16
    param and the int16 remainder at `work`."""
    if REM:
        x = load_joined(param, work, offs, mask)
    else:
        x = load_math(work, offs, mask, W_KIND)
    return x


@triton.jit
def store_weight(param, work, offs, x, mask, P_KIND: tl.constexpr, MASTER: tl.constexpr, REM: tl.constexpr,
                 SR: tl.constexpr, sr_key):
    """Store new weights `x`: the fp32 master (MASTER) and the param rounded
    once from it (store_param), or with REM the bf16 param and its remainder."""
    if REM:
        store_split(param, work, offs, x, mask)
    else:
        if MASTER:
            store_math(work, offs, x, mask, F32)
        store_param(param, offs, x, mask, P_KIND, SR, sr_key)


@triton.jit
def load_math(addr, offs, mask, KIND: tl.constexpr):
    """Load elements of the tensor at integer address `addr` in math precision
    (fp64 for fp64 storage, fp32 otherwise). Masked lanes read 0."""
    if KIND == BF16:
        bits = tl.load(addr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif KIND == F16:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif KIND == F64:
        x = tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    return x


@triton.jit
def load_state(addr, offs, mask, S_KIND: tl.constexpr, P_KIND: tl.constexpr):
    """Load a state stored as S_KIND in the math precision of P_KIND params:
    a bf16 state of an fp64 param is widened to fp64, as the reference's
    working copies are."""
    x = load_math(addr, offs, mask, S_KIND)
    if P_KIND == F64:
        x = x.to(tl.float64)
    return x


@triton.jit
def store_math(addr, offs, x, mask, KIND: tl.constexpr):
    """Store math-precision values `x`, rounded once to the storage dtype."""
    if KIND == BF16:
        # via fp32 for fp64 math, as torch converts double to bfloat16
        tl.store(addr.to(tl.pointer_type(tl.int16)) + offs, bf16_bits_rne(x.to(tl.float32)), mask=mask)
    elif KIND == F16:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)
    elif KIND == F64:
        tl.store(addr.to(tl.pointer_type(tl.float64)) + offs, x.to(tl.float64), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, x.to(tl.float32), mask=mask)


@triton.jit
def mix32(x):
    """Wellons' lowbias32 on uint32 values (csrc/include/fusedopt/numeric.h)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0xD35A2D97, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def sr_tensor_key(seed, t):
    """The stochastic-rounding key of tensor slot t in a launch with `seed`."""
    # tl.cast, not seed.to: Triton's JIT turns an int argument equal to 1 into a
    # constexpr (a plain int, without .to), and a seed is 1 once in 2^31 launches
    return mix32(tl.cast(seed, tl.uint32) ^ mix32(t.to(tl.uint32)))


@triton.jit
def launch_sr_key(seed, t, SR: tl.constexpr):
    """Tensor t's stochastic-rounding key when the launch rounds stochastically (SR), else 0."""
    key = 0
    if SR:
        key = sr_tensor_key(seed, t)
    return key


@triton.jit
def store_param(addr, offs, x, mask, KIND: tl.constexpr, SR: tl.constexpr, key):
    """Store the new param: rounded to nearest (store_math), or with SR (bf16
    params without masters) stochastically with the bits of each element's
    offset: fusedopt/reference/stochastic.py."""
    if SR:
        i = offs.to(tl.int64)
        low = (i & 0xFFFFFFFF).to(tl.uint32)
        high = (i >> 32).to(tl.uint32)
        bits = mix32(mix32(low + high * tl.full((), 0x9E3779B9, tl.uint32)) ^ key)
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + (bits & 0xFFFF)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
        tl.store(addr.to(tl.pointer_type(tl.int16)) + offs, r.to(tl.int16), mask=mask)
    else:
        store_math(addr, offs, x, mask, KIND)


@triton.jit
def bias_correction(step, log_beta):
    """1 - beta^step = 1 - exp(step * log(beta)) in fp64, from log(beta) in
    fp64 (f64). In fp32, tl.exp is the GPU's approximate ex2.approx, and the
    interpreter's numpy exp is not: in fp64 both are accurate to about an fp64
    ulp, so once rounded to fp32 they agree but for rare ties (not yet seen on
    a GPU). Near 0 (step * log(beta) > -0.25) the series of -expm1(x) to
    x^14 avoids the cancellation of 1 - exp(x) (truncation < 1e-18 relative:
    fp64-accurate for fp64 params)."""
    x = tl.cast(step, tl.float64) * log_beta
    s = x * 0.0 + 1.0  # expm1(x) = x * (1 + x/2 * (1 + x/3 * (... (1 + x/14))))
    for k in tl.static_range(14, 1, -1):
        s = 1.0 + s * (x / k)
    return tl.where(x > -0.25, -x * s, 1.0 - tl.exp(x))


@triton.jit
def sqrt_ieee(x, KIND: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is an approximation on GPUs)."""
    if KIND == F64:
        y = tl.sqrt(x)  # fp64 sqrt is IEEE on GPUs; sqrt_rn takes fp32 only
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def div_ieee(x, y, KIND: tl.constexpr):
    """Correctly rounded division (fp32 `/` is a 2-ulp approximation on GPUs)."""
    if KIND == F64:
        z = x / y
    else:
        z = tl.div_rn(x, y)
    return z


@triton.jit
def as_stored(x, KIND: tl.constexpr):
    """x rounded to the storage dtype and widened back to x's dtype: the
    value a later load of what store_math wrote returns."""
    if KIND == BF16:
        y = (bf16_bits_rne(x.to(tl.float32)).to(tl.int32) << 16).to(tl.float32, bitcast=True).to(x.dtype)
    elif KIND == F16:
        y = x.to(tl.float16).to(x.dtype)
    else:
        y = x
    return y


@triton.jit
def lerp(a, b, w):
    """torch.lerp as its kernels round it: one FMA from the nearer end."""
    d = b - a
    return tl.where(w < 0.5, tl.fma(d, w, a), tl.fma(d, w - 1.0, b))
