// Block-scaled FP8 optimizer states (state_dtype=torch.float8_e4m3fn), shared by
// the CPU loops and the CUDA kernels; fusedopt/reference/fp8_states.py is the
// specification and kernels/fp8_states.py spells the same operations in Triton.
//
// A state is stored as e4m3fn values q (the param's shape, contiguous) and one
// fp32 scale per block of kQBlock = 256 consecutive elements, recomputed at
// every store from the block's absmax:
//
//   amax  = max |x_i| over the block's finite x_i
//   scale = amax / 448                          value_i ~= float(q_i) * scale
//   inv   = amax > 0 ? min(448 / amax, FLT_MAX) : 0
//   q_i   = x_i finite ? fp8(clamp(x_i * inv, -448, 448)) : NaN (0x7F)
//   (the min: 448 / amax is inf for amax < 448 / FLT_MAX, and 0 * inf = NaN.
//   Finite only: an inf or NaN state (a grad's inf or NaN, as in torch) stays in
//   its own element; in the absmax it would make the scale inf or NaN and every
//   value of its block NaN.)
//
// The second moments are stored as sqrt(v) (correctly rounded) and decoded as
// s * s, which keeps them within e4m3's dynamic range inside a block.
// Chunks of the multi-tensor launch are multiples of kQBlock, so no block is
// split between two threads (CPU) or thread blocks (CUDA).
#pragma once

#include "fusedopt/fp8.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

constexpr int64_t kQBlock = 256;

// e4m3fn bits -> fp32, exact. Normal numbers: rebias the exponent (7 -> 127);
// subnormals: m * 2^-9; 0x7F / 0xFF: NaN. Selects, not branches, so loops vectorize.
FUSEDOPT_HD float e4m3fn_to_float(uint8_t b) {
  const uint32_t mag = b & 0x7Fu;
  const uint32_t normal = (mag << 20) + (120u << 23);
  const uint32_t subnormal = float_to_bits(float(int32_t(mag & 7u)) * 0.001953125f);
  uint32_t bits = mag >= 8u ? normal : subnormal;  // integer selects: the loops stay vectorized
  bits = mag == 0x7Fu ? 0x7FC00000u : bits;
  return bits_to_float(bits | (uint32_t(b & 0x80u) << 24));
}

FUSEDOPT_HD float q8_scale(float amax) { return amax / 448.0f; }
FUSEDOPT_HD float q8_inv(float amax) {
  const float inv = 448.0f / amax;
  const float finite = inv < 3.40282347e+38f ? inv : 3.40282347e+38f;  // FLT_MAX: a tiny amax overflows 448 / amax
  return amax > 0.0f ? finite : 0.0f;
}
// |x| as bits for the block's absmax (an integer max): 0 for inf and NaN.
FUSEDOPT_HD uint32_t q8_abs_bits(float x) {
  const uint32_t a = abs_bits(x);
  return a < 0x7F800000u ? a : 0u;
}
FUSEDOPT_HD uint8_t q8_encode(float x, float inv) {
  const uint8_t bits = cast_fp8<Fp8Format::kE4M3FN>(x, inv).bits;
  return abs_bits(x) < 0x7F800000u ? bits : uint8_t(0x7F);  // inf and NaN: NaN
}

// A state's stored value as fp32: v = s * s for the second moments (SQRT).
template <bool SQRT>
FUSEDOPT_HD float q8_decode(uint8_t q, float scale) {
  const float s = e4m3fn_to_float(q) * scale;
  return SQRT ? s * s : s;
}

}  // namespace fusedopt
