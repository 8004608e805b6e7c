// Conversions between storage dtypes and the math precision (fp32, or fp64 for
// fp64 tensors). Written with integer operations on the bit patterns so that
// the CPU and the GPU round identically (round-to-nearest-even), and so that
// the CPU loops vectorise without depending on compiler support for _Float16.
#pragma once

#include <cstring>
#include <math.h>
#include <type_traits>

#include "fusedopt/common.h"

namespace fusedopt {

// 16-bit storage types: plain bit containers, converted explicitly.
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

FUSEDOPT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FUSEDOPT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bf16 is the top half of an fp32: widening is a shift.
FUSEDOPT_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round-to-nearest-even: add 0x7FFF plus the lowest kept bit, then truncate.
// NaN becomes the canonical quiet NaN 0x7FC0 (as torch does on the CPU), so a
// NaN payload can never round up into infinity.
FUSEDOPT_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return is_nan ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// IEEE half -> float, exact (handles subnormals, inf and NaN).
FUSEDOPT_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t out;
  if (exp == 0x1Fu) {                       // inf / NaN
    out = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {                    // normal: rebias 15 -> 127
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  } else {                                  // zero or subnormal: mant * 2^-24
    const float mag = float(mant) * 5.9604644775390625e-08f;
    out = sign | float_to_bits(mag);
  }
  return bits_to_float(out);
}

// float -> IEEE half with round-to-nearest-even, overflow to inf, NaN kept NaN.
FUSEDOPT_HD uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return uint16_t(sign | 0x7E00u);   // NaN
  if (u >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (u < 0x38800000u) {
    // Result is subnormal (or zero): adding 0.5 lines the half's subnormal
    // ulp (2^-24) up with the float ulp at 0.5, so the FPU's own
    // round-to-nearest-even does the rounding; the low bits are the result.
    const float shifted = bits_to_float(u) + 0.5f;
    return uint16_t(sign | uint16_t(float_to_bits(shifted) - 0x3F000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits.
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + odd;
  return uint16_t(sign | uint16_t(u >> 13));
}

// Rounding follows torch's own kernels where that is well defined: torch
// computes lerp as one fused multiply-add from the nearer end (the weight < 0.5
// test) and addcmul's self + value*t1*t2 as fma(value*t1, t2, self); the
// kernels write those FMAs out and everything else is built without
// contraction (-ffp-contract=off, --fmad=false). Division and sqrt are IEEE
// (correctly rounded) here, while torch's vectorised CPU sqrt is not always
// (off by one ulp in ~1% of elements on AVX-512), so results agree with torch
// to an ulp or so per step, not bit for bit.
FUSEDOPT_HD float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
FUSEDOPT_HD double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
FUSEDOPT_HD T lerp(T a, T b, T w) {
  const T d = b - a;
  return (w < T(0.5)) ? fused_mul_add(w, d, a) : fused_mul_add(w - T(1), d, b);
}

// Storage <-> math conversions, overloaded on the storage type.
FUSEDOPT_HD float to_math(float x) { return x; }
FUSEDOPT_HD double to_math(double x) { return x; }
FUSEDOPT_HD float to_math(bf16 x) { return bf16_to_float(x.bits); }
FUSEDOPT_HD float to_math(fp16 x) { return half_to_float(x.bits); }

template <typename S> struct Store;
template <> struct Store<float> { FUSEDOPT_HD static float from(float x) { return x; } };
template <> struct Store<double> { FUSEDOPT_HD static double from(double x) { return x; } };
template <> struct Store<bf16> { FUSEDOPT_HD static bf16 from(float x) { return bf16{float_to_bf16(x)}; } };
template <> struct Store<fp16> { FUSEDOPT_HD static fp16 from(float x) { return fp16{float_to_half(x)}; } };

// Math precision of a storage type: fp64 stays fp64, everything else is fp32.
template <typename S> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

// --- stochastic rounding (fp32 -> bf16) ------------------------------------
//
// Unbiased: add 16 uniformly random bits below the kept ones, then truncate,
// so x rounds up with probability (its distance from the bf16 below) / ulp.
// The bits come from a counter-based hash of (launch seed, tensor slot, element
// offset), so every backend draws the same bits for the same element in any
// order: fusedopt/reference/stochastic.py and kernels/_numeric.py spell the
// same functions. NaN becomes 0x7FC0 as in float_to_bf16; a value within one
// ulp of the largest bf16 may round up to infinity, as stochastic rounding does.
struct StochasticRounding {
  bool on = false;
  uint32_t seed = 0;  // one per launch, drawn from torch's generator
};

// A 32-bit bijective integer hash (Wellons' "lowbias32" with the constants
// of his hash prospector's best two-multiply round).
FUSEDOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0xD35A2D97u;
  x ^= x >> 15;
  return x;
}

// Per tensor of a launch, once: the key its elements' bits are drawn with.
FUSEDOPT_HD uint32_t sr_tensor_key(uint32_t seed, int64_t tensor) { return mix32(seed ^ mix32(uint32_t(tensor))); }

// The random bits of element `index` (its flat offset in the tensor): the key
// enters after a first hash of the offset (fusedopt/reference/stochastic.py).
FUSEDOPT_HD uint32_t sr_random(uint32_t key, int64_t index) {
  const uint64_t i = uint64_t(index);
  return mix32(mix32(uint32_t(i) + uint32_t(i >> 32) * 0x9E3779B9u) ^ key);
}

FUSEDOPT_HD uint16_t float_to_bf16_stochastic(float f, uint32_t random) {
  const uint32_t u = float_to_bits(f);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + (random & 0xFFFFu)) >> 16;
  return is_nan ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// --- fp32 masters as a bf16 param + an int16 remainder -----------------------
//
// master_weights="remainder" (fusedopt/reference/remainder.py proves the
// encoding): the master's lower 16 bits are kept, and the param is its upper
// half rounded by their top bit (so a negative remainder says "rounded up").
// Exact for every fp32 but NaN; a NaN master gives the param 0x7FC0.
FUSEDOPT_HD float join_remainder(bf16 param, int16_t rem) {
  const uint32_t upper = (uint32_t(param.bits) - (rem < 0 ? 1u : 0u)) & 0xFFFFu;
  return bits_to_float((upper << 16) | uint32_t(uint16_t(rem)));
}

FUSEDOPT_HD bf16 split_remainder(float master, int16_t& rem) {
  const uint32_t u = float_to_bits(master);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  rem = int16_t(uint16_t(u & 0xFFFFu));
  return bf16{is_nan ? uint16_t(0x7FC0) : uint16_t((u >> 16) + ((u >> 15) & 1u))};
}

// Which storage combinations have a stochastically rounded variant: bf16
// params that are their own working copy (with a master, the master keeps
// the precision).
template <typename P, bool MASTER>
constexpr bool kStochasticRoundable = std::is_same<P, bf16>::value && !MASTER;

// How a kernel stores the param: rounded to nearest, or (SR: bf16 params
// without master weights only) stochastically with the bits of `index`.
template <typename P, bool SR, typename T>
FUSEDOPT_HD P store_param(T x, uint32_t key, int64_t index) {
  if constexpr (SR) {
    return bf16{float_to_bf16_stochastic(float(x), sr_random(key, index))};
  } else {
    (void)key;
    (void)index;
    return Store<P>::from(x);
  }
}

}  // namespace fusedopt
