// FP8 (e4m3fn, e5m2): saturating scaled casts and the per-tensor absmax,
// shared by the CPU loops and the CUDA kernels. The cast of x with scale s is
//
//   y = clamp(float(x) * s, -max, max)  rounded to nearest even in the format
//
// bit for bit what torch computes for `(x.float() * s).clamp(-max, max).to(dtype)`
// (max: 448 for e4m3fn, 57344 for e5m2; NaN stays NaN: 0x7F, or 0xFF with the
// sign; e4m3fn has no infinity, so clamping first is what makes the cast
// saturate). Written with integer operations on the fp32 bits, like the 16-bit
// conversions in numeric.h, so every backend rounds identically
// (kernels/_fp8.py spells the same steps; no GPU's fp8 instructions needed).
#pragma once

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

enum class Fp8Format : int { kE4M3FN = 0, kE5M2 = 1 };

struct fp8 { uint8_t bits; };

// Largest finite value of each format.
FUSEDOPT_HD float fp8_max(Fp8Format f) { return f == Fp8Format::kE4M3FN ? 448.0f : 57344.0f; }

// fp32 -> fp8, round to nearest even, for |x| <= max or NaN (the caller clamps).
//   MANT: mantissa bits kept (3 or 2); BIAS: the format's exponent bias (7 or 15).
// Normal results: rebias the exponent and round the 23 - MANT dropped bits
// (add half an ulp minus one, plus the lowest kept bit, then truncate).
// Results below the smallest normal (2^(1 - BIAS)): adding C = 2^(24 - BIAS - MANT)
// in fp32 lines fp32's ulp at C (C * 2^-23) up with fp8's subnormal ulp
// (2^(1 - BIAS - MANT)), so the FPU's own round-to-nearest-even does the work
// and the low bits of the sum are the result.
template <int MANT, int BIAS>
FUSEDOPT_HD uint8_t float_to_fp8_bits(float x) {
  uint32_t u = float_to_bits(x);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return uint8_t(sign | 0x7Fu);  // NaN
  constexpr uint32_t kSmallestNormal = uint32_t(127 + 1 - BIAS) << 23;
  if (u < kSmallestNormal) {
    constexpr uint32_t kAlign = uint32_t(127 + 24 - BIAS - MANT) << 23;  // C
    const float shifted = bits_to_float(u) + bits_to_float(kAlign);
    return uint8_t(sign | uint8_t(float_to_bits(shifted) - kAlign));
  }
  constexpr int kDropped = 23 - MANT;
  const uint32_t odd = (u >> kDropped) & 1u;
  u += (uint32_t(BIAS - 127) << 23) + ((1u << (kDropped - 1)) - 1u) + odd;
  return uint8_t(sign | uint8_t(u >> kDropped));
}

// The scaled, saturating cast of one value (already in fp32).
template <Fp8Format F>
FUSEDOPT_HD fp8 cast_fp8(float x, float scale) {
  constexpr float kMax = F == Fp8Format::kE4M3FN ? 448.0f : 57344.0f;
  float y = x * scale;
  y = y > kMax ? kMax : (y < -kMax ? -kMax : y);  // NaN compares false: stays NaN, as torch.clamp
  return fp8{F == Fp8Format::kE4M3FN ? float_to_fp8_bits<3, 7>(y) : float_to_fp8_bits<2, 15>(y)};
}

// max(a, |x|), NaN-propagating (as torch's amax).
FUSEDOPT_HD float absmax_step(float a, float x) {
  const float m = x < 0.0f ? -x : x;
  return (m > a || m != m) ? m : a;
}

// Launchers. Table rows: the inputs (dtype `input_dtype`: fp32, bf16, fp16),
// the fp8 outputs. `scales`: one fp32 per tensor. Writes each tensor's absmax
// of the input (before scaling) into amax[t] (a double holding an fp32 value:
// the CUDA side reuses the norms' double-precision combine).
// Every launch reads its scales from memory of its own device.
constexpr int kFp8RowInput = 0;
constexpr int kFp8RowOutput = 1;
constexpr int kFp8Rows = 2;

void cast_fp8_cpu(const TensorTable& tt, DType input_dtype, Fp8Format format, const float* scales, double* amax,
                  int num_threads);
// CUDA: `partials` is device scratch of n_chunks doubles; chunk_first as for power_sums_cuda.
const char* cast_fp8_cuda(const TensorTable& tt, const int64_t* chunk_first, DType input_dtype, Fp8Format format,
                          const float* scales, double* partials, double* amax, void* stream);

}  // namespace fusedopt
