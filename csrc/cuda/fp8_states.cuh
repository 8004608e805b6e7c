// Block-scaled FP8 states in the CUDA kernels (include/fusedopt/fp8_states.h).
// A state block of kQBlock elements is held by kGroup consecutive threads
// (kILP elements each) of one loop iteration of a thread block; its absmax is
// a warp-shuffle reduction and then one over the group's warps through shared
// memory. Every thread of the block must make the same calls (they contain
// barriers): the kernels run every loop iteration with all threads, and lanes
// past the end of a chunk load zeros and store nothing. Chunks are multiples
// of kQBlock.
#pragma once

#include <type_traits>

#include "fusedopt/fp8_states.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace cuda {

constexpr int kGroup = int(kQBlock) / kILP;
static_assert(kGroup % 32 == 0 && kThreads % kGroup == 0, "a state block must be whole warps of one thread block");

// max of `bits` over this thread's group, for each of its threads. `scratch`:
// kThreads / 32 words of shared memory.
__device__ __forceinline__ uint32_t group_max(uint32_t bits, uint32_t* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint32_t other = __shfl_xor_sync(0xFFFFFFFFu, bits, offset);
    bits = other > bits ? other : bits;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = bits;
  __syncthreads();
  const int first = int(threadIdx.x) / kGroup * (kGroup / 32);
  uint32_t m = 0;
#pragma unroll
  for (int w = 0; w < kGroup / 32; ++w) m = scratch[first + w] > m ? scratch[first + w] : m;
  __syncthreads();  // scratch is reused by the next call
  return m;
}

// Elements [i, i + kILP) (of the chunk's `len`) of one state: their new values
// x (already as stored: sqrt for second moments) encoded with the scale of
// their block, which the group's first thread writes. Every thread's reads of
// the old scales must come before the first call (its barrier orders them).
// `stored` (optional): the values as a later decode reads them (before any square).
__device__ __forceinline__ void q8_store_group(uint8_t* q, float* scales, int64_t i, int64_t len, bool aligned,
                                               const float (&x)[kILP], uint32_t* scratch,
                                               float* stored = nullptr) {
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < kILP; ++k) {
    const uint32_t a = q8_abs_bits(x[k]);  // the finite values' absmax
    if (i + k < len && a > bits) bits = a;  // lanes past the end belong to no block
  }
  const float amax = bits_to_float(group_max(bits, scratch)), inv = q8_inv(amax);
  uint8_t out[kILP];
#pragma unroll
  for (int k = 0; k < kILP; ++k) out[k] = q8_encode(x[k], inv);
  store_pack(q, out, i, len, aligned);
  if (stored != nullptr) {
#pragma unroll
    for (int k = 0; k < kILP; ++k) stored[k] = q8_decode<false>(out[k], q8_scale(amax));
  }
  if (i < len && threadIdx.x % kGroup == 0) scales[i / kQBlock] = q8_scale(amax);
}

// A thread's kILP elements of one optimizer state as the storage type S
// holds them: plainly (float, double, bf16, fp16) or block-scaled FP8 (S =
// fp8: codes with a scale per kQBlock elements; SQRT: a second moment, kept
// as its square root). load() before the update, get/set per element,
// store() after; every thread of the block makes the same calls (FP8's
// store has barriers), so kernels run every loop iteration with all threads.
template <typename S, bool SQRT>
struct StatePack {
  static constexpr bool kFp8 = std::is_same<S, fp8>::value;
  using Code = typename std::conditional<kFp8, uint8_t, S>::type;
  using Out = typename std::conditional<kFp8, float, S>::type;
  Code* q;
  float* scales;  // FP8: the chunk's block scales
  Code in[kILP];
  Out out[kILP];
  float scale = 0.0f;  // FP8: this thread's block's scale
  float kept[kILP];    // FP8, after store(i, ..., true): the new values as the next load decodes them (sqrt)

  __device__ StatePack(const TensorTable& tt, int row, int scale_row, int64_t t, int64_t start)
      : q(tt.ptr<Code>(row, t) + start), scales(kFp8 ? tt.ptr<float>(scale_row, t) + start / kQBlock : nullptr) {}

  __device__ bool aligned() const { return is_aligned(q); }

  __device__ void load(int64_t i, int64_t n, bool aligned) {
    load_pack(in, q, i, n, aligned);
    if constexpr (kFp8) scale = i < n ? scales[i / kQBlock] : 0.0f;  // (kILP elements lie in one block)
  }

  template <typename T>
  __device__ T get(int k) const {
    if constexpr (kFp8) return T(q8_decode<SQRT>(in[k], scale));
    else return T(to_math(in[k]));
  }

  template <typename T>
  __device__ void set(int k, T x) {
    if constexpr (kFp8) out[k] = SQRT ? sqrtf(float(x)) : float(x);
    else out[k] = Store<S>::from(x);
  }

  // The new value of element k as stored (store(..., keep=true) first for FP8).
  template <typename T>
  __device__ T stored(int k) const {
    if constexpr (kFp8) return SQRT ? T(kept[k] * kept[k]) : T(kept[k]);
    else return T(to_math(out[k]));
  }

  // scratch: kThreads / 32 words of shared memory (FP8). Every thread's load() comes before the first store().
  __device__ void store(int64_t i, int64_t n, bool aligned, uint32_t* scratch, bool keep = false) {
    if constexpr (kFp8) q8_store_group(q, scales, i, n, aligned, out, scratch, keep ? kept : nullptr);
    else store_pack(q, out, i, n, aligned);
  }
};

}  // namespace cuda
}  // namespace fusedopt
