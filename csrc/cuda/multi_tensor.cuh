// Helpers for the multi-tensor CUDA kernels: each thread block takes one chunk
// of one tensor (TensorTable), each thread kILP consecutive elements per
// iteration, moved with one vector load/store when every pointer is aligned.
#pragma once

#include <cuda_runtime.h>

#include "fusedopt/multi_tensor.h"

namespace fusedopt {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kILP = 4;

template <typename X>
struct alignas(sizeof(X) * kILP) Pack {
  X v[kILP];
};

template <typename X>
__device__ __forceinline__ bool is_aligned(const X* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<X>) == 0;
}

// Load kILP elements starting at i (of n), zero past the end.
template <typename X>
__device__ __forceinline__ void load_pack(X (&dst)[kILP], const X* src, int64_t i, int64_t n, bool aligned) {
  if (aligned && i + kILP <= n) {
    const Pack<X> p = *reinterpret_cast<const Pack<X>*>(src + i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) dst[k] = p.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) dst[k] = (i + k < n) ? src[i + k] : X{};
  }
}

template <typename X>
__device__ __forceinline__ void store_pack(X* dst, const X (&src)[kILP], int64_t i, int64_t n, bool aligned) {
  if (aligned && i + kILP <= n) {
    Pack<X> p;
#pragma unroll
    for (int k = 0; k < kILP; ++k) p.v[k] = src[k];
    *reinterpret_cast<Pack<X>*>(dst + i) = p;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (i + k < n) dst[i + k] = src[k];
  }
}

// The chunk handled by this block: tensor index, first element, length.
struct Chunk {
  int64_t tensor, start, len;
};

__device__ __forceinline__ Chunk block_chunk(const TensorTable& tt) {
  Chunk c;
  c.tensor = tt.chunk_tensor[blockIdx.x];
  c.start = tt.chunk_start[blockIdx.x];
  const int64_t remaining = tt.numel[c.tensor] - c.start;
  c.len = remaining < tt.chunk_size ? remaining : tt.chunk_size;
  return c;
}

}  // namespace cuda
}  // namespace fusedopt
