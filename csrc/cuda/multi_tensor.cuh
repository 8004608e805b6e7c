// Helpers for the multi-tensor CUDA kernels: each thread block takes one chunk
// of one tensor (TensorTable), each thread kILP consecutive elements per
// iteration, moved with one vector load/store when every pointer is aligned.
#pragma once

#include <cuda_runtime.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

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

// A thread's kILP weights of one chunk: the param itself, an fp32 master
// beside it (MASTER: the param is written, not read), or (REM, MASTER with
// bf16 params: master_weights="remainder") the bf16 param with its int16
// remainder in the master row, joined into the fp32 master and split back
// (numeric.h). load() before the update, get/set per element, store() after.
template <typename P, bool MASTER, bool REM>
struct WeightPack {
  static_assert(!REM || MASTER, "remainders are masters");
  P* param;
  float* master;
  int16_t* rem;
  P p[kILP];
  float m[kILP];
  int16_t r[kILP];

  __device__ WeightPack(const TensorTable& tt, int param_row, int master_row, int64_t t, int64_t start)
      : param(tt.ptr<P>(param_row, t) + start),
        master(MASTER && !REM ? tt.ptr<float>(master_row, t) + start : nullptr),
        rem(REM ? tt.ptr<int16_t>(master_row, t) + start : nullptr) {}

  __device__ bool aligned() const {
    return is_aligned(param) && (!MASTER || REM || is_aligned(master)) && (!REM || is_aligned(rem));
  }

  __device__ void load(int64_t i, int64_t n, bool aligned) {
    if (MASTER && !REM) load_pack(m, master, i, n, aligned);
    else load_pack(p, param, i, n, aligned);
    if (REM) load_pack(r, rem, i, n, aligned);
  }

  template <typename T>
  __device__ T get(int k) const {
    if constexpr (REM) return T(join_remainder(p[k], r[k]));
    else if constexpr (MASTER) return T(m[k]);
    else return T(to_math(p[k]));
  }

  // x: the new weight of element k, `index` its offset in the tensor (stochastic rounding's counter)
  template <bool SR, typename T>
  __device__ void set(int k, T x, uint32_t sr_key, int64_t index) {
    if constexpr (REM) {
      p[k] = split_remainder(float(x), r[k]);
    } else {
      if constexpr (MASTER) m[k] = float(x);
      p[k] = store_param<P, SR>(x, sr_key, index);
    }
  }

  __device__ void store(int64_t i, int64_t n, bool aligned) {
    if (MASTER && !REM) store_pack(master, m, i, n, aligned);
    if (REM) store_pack(rem, r, i, n, aligned);
    store_pack(param, p, i, n, aligned);
  }
};

// WeightPack and the grads beside it (read only) in the Adam-family rows: what an update reads.
template <typename P, bool MASTER, bool REM>
struct UpdatePack : WeightPack<P, MASTER, REM> {
  const P* grad_ptr;
  P g[kILP];

  __device__ UpdatePack(const TensorTable& tt, int64_t t, int64_t start)
      : WeightPack<P, MASTER, REM>(tt, kRowParam, kRowMaster, t, start),
        grad_ptr(tt.ptr<const P>(kRowGrad, t) + start) {}

  __device__ bool aligned() const { return WeightPack<P, MASTER, REM>::aligned() && is_aligned(grad_ptr); }

  __device__ void load(int64_t i, int64_t n, bool aligned) {
    WeightPack<P, MASTER, REM>::load(i, n, aligned);
    load_pack(g, grad_ptr, i, n, aligned);
  }

  template <typename T>
  __device__ T grad(int k) const { return T(to_math(g[k])); }
};

// The chunk walk of the element-wise kernels: body(i) for each of this
// thread's packs [i, i + kILP) of a chunk of `len` elements. Every thread runs
// every iteration (an FP8 state's store has barriers, fp8_states.cuh); lanes
// past the end load zeros and store nothing.
template <typename Body>
__device__ __forceinline__ void walk_chunk(int64_t len, Body&& body) {
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kILP) body(base + int64_t(threadIdx.x) * kILP);
}

// Element e of a chunk's weights read one at a time, as WeightPack::get does a pack's.
template <typename T, bool MASTER, bool REM, typename P>
__device__ __forceinline__ T weight_at(const P* param, const float* master, const int16_t* rem, int64_t e) {
  if constexpr (REM) return T(join_remainder(param[e], rem[e]));
  else if constexpr (MASTER) return T(master[e]);
  else return T(to_math(param[e]));
}

// Tree reduction of one value per thread (sum, or max for kInf) and of a NaN
// flag; thread 0 gets the result.
template <typename Acc, bool IS_MAX>
__device__ __forceinline__ Acc block_reduce(Acc value, int& nan) {
  __shared__ Acc values[kThreads];
  __shared__ int nans[kThreads];
  values[threadIdx.x] = value;
  nans[threadIdx.x] = nan;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) {
      const Acc other = values[threadIdx.x + stride];
      values[threadIdx.x] = IS_MAX ? (other > values[threadIdx.x] ? other : values[threadIdx.x])
                                   : values[threadIdx.x] + other;
      nans[threadIdx.x] |= nans[threadIdx.x + stride];
    }
    __syncthreads();
  }
  nan = nans[0];
  return values[0];
}

// Level two of a per-tensor reduction: one block per tensor combines that
// tensor's chunk partials [chunk_first[t], chunk_first[t + 1]) in a fixed
// order (sum, or max), NaN-propagating.
template <bool IS_MAX>
__global__ void __launch_bounds__(kThreads) combine_kernel(const double* partials, const int64_t* chunk_first,
                                                           double* out) {
  const int64_t lo = chunk_first[blockIdx.x], hi = chunk_first[blockIdx.x + 1];
  double acc = 0.0;
  int nan = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const double v = partials[i];
    nan |= int(v != v);
    acc = IS_MAX ? (v > acc ? v : acc) : acc + v;
  }
  const double total = block_reduce<double, IS_MAX>(acc, nan);
  if (threadIdx.x == 0) out[blockIdx.x] = nan ? double(NAN) : total;
}

}  // namespace cuda
}  // namespace fusedopt
