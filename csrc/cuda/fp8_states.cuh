// Block-scaled FP8 states in the CUDA kernels (include/fusedopt/fp8_states.h).
// A state block of kQBlock elements is held by kGroup consecutive threads
// (kILP elements each) of one loop iteration of a thread block; its absmax is
// a warp-shuffle reduction and then one over the group's warps through shared
// memory. Every thread of the block must make the same calls (they contain
// barriers): the kernels run every loop iteration with all threads, and lanes
// past the end of a chunk load zeros and store nothing. Chunks are multiples
// of kQBlock.
#pragma once

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

}  // namespace cuda
}  // namespace fusedopt
