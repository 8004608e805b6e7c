// Optimizer states in the CPU loops (include/fusedopt/fp8_states.h for the
// FP8 format): StateBlock, one state plain or block-scaled, and
// q8_store_blocks, the block walk Adafactor's FP8 first moment uses. A
// block's new FP8 values need the block's absmax before any of them can be
// stored, so each block of kQBlock elements is done in two steps: a vector
// loop over the block reads the old states with the old scales, updates
// everything else and leaves the new state values (already as stored: sqrt
// for the second moments) in an L1 buffer; then each state's absmax gives its
// new scale and the values are encoded. Chunks start at multiples of kQBlock.
#pragma once

#include <cmath>
#include <type_traits>

#include "fusedopt/fp8_states.h"
#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

// q[s], scales[s]: state s's bytes and scales from the chunk's first element.
// body(b0, n, out): elements [b0, b0 + n) of the chunk; out[s][0..n) the new values.
// after(b0, n): runs once the block is encoded (LAMB reads the states back as stored).
struct NoAfter {
  void operator()(int64_t, int64_t) const {}
};

// Encode a block's n new values x (as stored: sqrt for second moments) with
// the scale of their absmax, written to *scale.
inline void q8_encode_block(uint8_t* __restrict__ dst, float* scale, const float* __restrict__ x, int64_t n) {
  uint32_t amax_bits = 0;  // absmax of the finite values (fp8_states.h: q8_abs_bits)
#pragma omp simd reduction(max : amax_bits)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = q8_abs_bits(x[i]);
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  const float amax = bits_to_float(amax_bits), inv = q8_inv(amax);
  *scale = q8_scale(amax);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = q8_encode(x[i], inv);
}

template <int NS, typename Body, typename After = NoAfter>
inline void q8_store_blocks(int64_t len, uint8_t* const (&q)[NS], float* const (&scales)[NS], Body&& body,
                            After&& after = After{}) {
  alignas(64) float out[NS][kQBlock];
  for (int64_t b0 = 0; b0 < len; b0 += kQBlock) {
    const int64_t n = len - b0 < kQBlock ? len - b0 : kQBlock;
    body(b0, n, out);
    for (int s = 0; s < NS; ++s) q8_encode_block(q[s] + b0, &scales[s][b0 / kQBlock], out[s], n);
    after(b0, n);
  }
}

// One optimizer state of a chunk in a CPU loop, stored plainly (S: float,
// double, bf16, fp16) or block-scaled (S = fp8; SQRT: a second moment, kept
// as its square root). A loop over an FP8 state walks the chunk in blocks of
// kQBlock elements: block(b0) gives the block's view, whose get(i) reads
// element b0 + i of the chunk and set(i, x) writes it in the block's SIMD loop (a
// plain state in place, an FP8 one into an L1 buffer); end_block(b0, n) then
// encodes the buffer with the block's new scale. For a plain state the view
// is the state itself and end_block does nothing.
template <typename S, bool SQRT>
struct StateBlock {
  static constexpr bool kFp8 = std::is_same<S, fp8>::value;
  using Code = typename std::conditional<kFp8, uint8_t, S>::type;

  // What the SIMD loop touches, by value (registers): an FP8 store into the
  // buffer cannot alias the scale or the pointers, and the loop vectorizes.
  struct View {
    Code* __restrict__ q;
    float* __restrict__ out;  // FP8: the buffer
    float scale;              // FP8: the block's scale as read

    template <typename T>
    T get(int64_t i) const {
      if constexpr (kFp8) return T(q8_decode<SQRT>(q[i], scale));
      else return T(to_math(q[i]));
    }

    template <typename T>
    void set(int64_t i, T x) const {
      if constexpr (kFp8) out[i] = SQRT ? sqrtf(float(x)) : float(x);
      else q[i] = Store<S>::from(x);
    }
  };

  Code* q;
  float* scales;  // FP8: the chunk's block scales
  alignas(64) float buf[kFp8 ? kQBlock : 1];

  StateBlock(const TensorTable& tt, int row, int scale_row, int64_t t, int64_t begin)
      : q(tt.ptr<Code>(row, t) + begin), scales(kFp8 ? tt.ptr<float>(scale_row, t) + begin / kQBlock : nullptr) {}

  // The view of the block from element b0, indexed from there (FP8: with the block's scale as it is now).
  View block(int64_t b0) {
    if constexpr (kFp8) return View{q + b0, buf, scales[b0 / kQBlock]};
    else return View{q + b0, nullptr, 0.0f};
  }

  void end_block(int64_t b0, int64_t n) {
    if constexpr (kFp8) q8_encode_block(q + b0, &scales[b0 / kQBlock], buf, n);
  }
};

}  // namespace fusedopt
