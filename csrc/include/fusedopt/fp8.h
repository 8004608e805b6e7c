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
// (kernels/fp8.py rounds the same way; no GPU's fp8 instructions needed).
#pragma once

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

enum class Fp8Format : int { kE4M3FN = 0, kE5M2 = 1 };

struct fp8 { uint8_t bits; };

// Largest finite value of each format.
FUSEDOPT_HD float fp8_max(Fp8Format f) { return f == Fp8Format::kE4M3FN ? 448.0f : 57344.0f; }

// The bits of |x| (a, as fp32 bits; |x| <= the format's max, not NaN: the caller
// saturates and handles NaN) -> fp8's magnitude bits, rounded to nearest even.
//   MANT: mantissa bits kept (3 or 2); BIAS: the format's exponent bias (7 or 15).
// One rule for normal and subnormal results: with a = |x| in [2^e, 2^(e+1)),
// fp8's ulp there is 2^(e - MANT), or 2^(1 - BIAS - MANT) below the smallest
// normal. Adding C, the power of two whose fp32 ulp (C * 2^-23) is that ulp,
//   C = max(2^(e - MANT + 23), 2^(24 - BIAS - MANT)),
// makes the FPU's own round-to-nearest-even round a to fp8's grid (the sum
// stays in C's binade, and its last bit has the parity of fp8's last
// mantissa bit), and k = bits(a + C) - bits(C) counts fp8 ulps. The fp8 bit
// pattern is then k + (E - 1) * 2^MANT with E = e + BIAS, which for the
// subnormal C is k itself; both read (bits(C) >> (23 - MANT)) - (151 - MANT - BIAS) * 2^MANT.
// About 8 vector operations and no branches, so the CPU loops that call this
// stay vectorized; checked equal to the per-case rounding for every fp32
// magnitude up to each format's max, and (through cast_fp8) to torch in tests/test_fp8.py.
template <int MANT, int BIAS>
FUSEDOPT_HD uint32_t fp8_magnitude_bits(uint32_t a) {
  constexpr uint32_t kSubnormalC = uint32_t(127 + 24 - BIAS - MANT) << 23;
  uint32_t c = (a & 0x7F800000u) + (uint32_t(23 - MANT) << 23);
  c = c > kSubnormalC ? c : kSubnormalC;
  const uint32_t sum = float_to_bits(bits_to_float(a) + bits_to_float(c));
  return sum - c + (c >> (23 - MANT)) - (uint32_t(151 - MANT - BIAS) << MANT);
}

// The scaled, saturating cast of one value (already in fp32). The clamp is
// done on the magnitude's bits (an unsigned min: |y| > max and infinities
// become max), NaN is recognised before it and kept: torch.clamp's result,
// in integer operations that vectorize without masks.
template <Fp8Format F>
FUSEDOPT_HD fp8 cast_fp8(float x, float scale) {
  constexpr uint32_t kMaxBits = F == Fp8Format::kE4M3FN ? 0x43E00000u : 0x47600000u;  // 448, 57344
  const uint32_t u = float_to_bits(x * scale);
  uint32_t a = u & 0x7FFFFFFFu;
  const bool nan = a > 0x7F800000u;
  a = a < kMaxBits ? a : kMaxBits;
  const uint32_t r = F == Fp8Format::kE4M3FN ? fp8_magnitude_bits<3, 7>(a) : fp8_magnitude_bits<2, 15>(a);
  return fp8{uint8_t(((u >> 24) & 0x80u) | (nan ? 0x7Fu : r))};
}

// |x| as its fp32 bits: for non-negative floats the integer order of the bits
// is the float order, and every NaN's bits exceed infinity's, so an unsigned
// max over abs_bits is a NaN-propagating absmax (as torch's amax) that
// vectorizes as a plain integer max reduction.
FUSEDOPT_HD uint32_t abs_bits(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }

// max(a, |x|), NaN-propagating (as torch's amax).
FUSEDOPT_HD float absmax_step(float a, float x) {
  const float m = x < 0.0f ? -x : x;
  return (m > a || m != m) ? m : a;
}

// An optimizer step that also writes an FP8 copy of each new weight w (the
// fp32 master, or an fp32 param): copy = cast_fp8(w, scale) with the tensor's
// scale (table row kRowFp8Scale), and amax[t] = max |w| for the next scale.
struct Fp8Copy {
  bool on = false;
  Fp8Format format = Fp8Format::kE4M3FN;
  double* partials = nullptr;  // [n_chunks] absmax per chunk (the CPU launcher allocates it)
  double* amax = nullptr;      // [n_tensors] absmax per tensor (host on CPU, device on CUDA)
  const int64_t* chunk_first = nullptr;  // CUDA: [n_tensors + 1] first chunk of each tensor (the combine)
};

// Which storage combinations can write FP8 copies: those whose working copy is fp32.
template <typename P, bool MASTER>
constexpr bool kFp8Copyable = MASTER || std::is_same<P, float>::value;

// Delayed scaling after a step that wrote FP8 copies (fusedopt.fp8.Float8Recipe.update_
// is the spec, bit for bit): per copy t, scale_inv[t] = 1 / the scale it was
// cast with; amax[t] joins history[t] (the oldest value leaves); the next
// scale = fp8_max / max(history[t]) / 2^margin, or the old one while that max
// is 0 or not finite. history: [n, len] row-major; scale_inv[t] at t * inv_stride
// (its rows are padded to 16 bytes: torch._scaled_mm takes them as scale pointers).
// One copy's update (divisor = 2^margin); the CPU loops over the copies, CUDA
// gives each a thread.
FUSEDOPT_HD void fp8_delayed_scaling_one(double amax, float* h, int64_t len, float* scale, float* scale_inv,
                                         float fp8_max, float divisor) {
  constexpr float kFloatMax = 3.40282347e+38f;
  for (int64_t k = len - 1; k > 0; --k) h[k] = h[k - 1];
  h[0] = float(amax);  // an fp32 value held in a double: exact
  float m = h[0];      // max of the history, NaN-propagating (torch.amax)
  for (int64_t k = 1; k < len; ++k) m = (m != m || m >= h[k]) ? m : h[k];
  const float old = *scale;
  *scale_inv = 1.0f / old;
  // at most FLT_MAX: a tiny amax overflows (Float8Recipe.scale_from); kept while m is 0, inf or NaN
  const float next = fp8_max / m / divisor;
  *scale = (m > 0.0f && m <= kFloatMax) ? (next < kFloatMax ? next : kFloatMax) : old;
}

void fp8_delayed_scaling_cpu(const double* amax, float* history, float* scales, float* scale_inv,
                             int64_t inv_stride, int64_t n, int64_t len, float fp8_max, int margin);
// The same on CUDA, one thread per copy; nothing when *found_inf (device, or null) is nonzero.
const char* fp8_delayed_scaling_cuda(const double* amax, float* history, float* scales, float* scale_inv,
                                     int64_t inv_stride, int64_t n, int64_t len, float fp8_max, int margin,
                                     const float* found_inf, void* stream);

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
