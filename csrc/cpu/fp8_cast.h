// The scaled FP8 cast of a span of values and their absmax (include/fusedopt/fp8.h),
// as one vector loop: what cast_to_fp8 runs over each chunk and what AdamW's
// FP8 weight copies run over each block of new weights.
//
// Why a loop of its own rather than a few lines inside the optimizer's loop:
// fused into AdamW's update, the cast's ~16 vector operations per 16 values
// raise the register pressure past the 32 vector registers (GCC unrolls
// the byte-output loop 4x to fill a 64-byte store and spills the moments and
// the absmax accumulators to the stack every iteration), and the step became
// compute-bound. Casting each block of new weights from L1 right after the
// update costs one extra L1 read per value.
#pragma once

#include "fusedopt/fp8.h"

namespace fusedopt {

// y[i] = cast_fp8<F>(x[i] widened to fp32, scale) for i in [0, n); returns
// max(amax_bits, abs_bits of every x[i]) (a NaN-propagating absmax: fp8.h).
template <Fp8Format F, typename S>
inline uint32_t cast_fp8_span(const S* __restrict__ x, fp8* __restrict__ y, int64_t n, float scale,
                              uint32_t amax_bits) {
#pragma omp simd reduction(max : amax_bits)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_math(x[i]);
    y[i] = cast_fp8<F>(v, scale);
    const uint32_t a = abs_bits(v);
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  return amax_bits;
}

}  // namespace fusedopt
