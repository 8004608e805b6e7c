// Block-scaled FP8 states on the CPU (include/fusedopt/fp8_states.h): the
// walk over one chunk that every optimizer's FP8-state loop shares. A block's
// new state values need the block's absmax before any of them can be stored,
// so each block of kQBlock elements is done in two steps: `body` (a vector
// loop over the block) reads the old states with the old scales, updates
// everything else and leaves the new state values (already as stored: sqrt
// for the second moments) in `out`; then each state's absmax gives its new
// scale and the values are encoded. Chunks start at multiples of kQBlock.
#pragma once

#include "fusedopt/fp8_states.h"

namespace fusedopt {

// q[s], scales[s]: state s's bytes and scales from the chunk's first element.
// body(b0, n, out): elements [b0, b0 + n) of the chunk; out[s][0..n) the new values.
// after(b0, n): runs once the block is encoded (LAMB reads the states back as stored).
struct NoAfter {
  void operator()(int64_t, int64_t) const {}
};

template <int NS, typename Body, typename After = NoAfter>
inline void q8_store_blocks(int64_t len, uint8_t* const (&q)[NS], float* const (&scales)[NS], Body&& body,
                            After&& after = After{}) {
  alignas(64) float out[NS][kQBlock];
  for (int64_t b0 = 0; b0 < len; b0 += kQBlock) {
    const int64_t n = len - b0 < kQBlock ? len - b0 : kQBlock;
    body(b0, n, out);
    for (int s = 0; s < NS; ++s) {
      uint32_t amax_bits = 0;  // absmax of the finite values (fp8_states.h: q8_abs_bits)
#pragma omp simd reduction(max : amax_bits)
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t a = q8_abs_bits(out[s][i]);
        amax_bits = a > amax_bits ? a : amax_bits;
      }
      const float amax = bits_to_float(amax_bits), inv = q8_inv(amax);
      scales[s][b0 / kQBlock] = q8_scale(amax);
      uint8_t* __restrict__ dst = q[s] + b0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = q8_encode(out[s][i], inv);
    }
    after(b0, n);
  }
}

}  // namespace fusedopt
