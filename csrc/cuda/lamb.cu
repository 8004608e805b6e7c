// LAMB on CUDA (include/fusedopt/lamb.h): the moments pass (one block per
// chunk; m and v written; block-reduced partials of sum(p^2), sum(u^2)), the
// per-tensor combine of those partials (multi_tensor.cuh), and the apply pass.
// Everything that changes between steps is read from device memory. No torch
// headers.
#include <cuda_runtime.h>

#include "fp8_states.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/lamb.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

// The chunk's tensor's scalars, computed once per block.
template <typename T>
__device__ LambScalars<T> block_scalars(const TensorTable& tt, const LambHyper& h, int64_t tensor) {
  __shared__ LambScalars<T> shared;
  if (threadIdx.x == 0) shared = lamb_scalars<T>(h, double(*tt.ptr<const float>(kRowStep, tensor)));
  __syncthreads();
  return shared;
}

// S: the moments' storage (fp8: block-scaled, StatePack); u is formed from
// the moments as stored.
template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
__global__ void __launch_bounds__(kThreads) moments_kernel(TensorTable tt, LambHyper h, double* partials) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) {  // GradScaler found inf/NaN: nothing moves
    if (threadIdx.x == 0) partials[blockIdx.x] = partials[tt.n_chunks + blockIdx.x] = 0.0;
    return;
  }
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const LambScalars<T> s = block_scalars<T>(tt, h, t);
  UpdatePack<P, MASTER, REM> w(tt, t, chunk.start);  // (the weights: read only)
  StatePack<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, chunk.start);
  StatePack<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, chunk.start);
  const bool aligned = w.aligned() && m.aligned() && v.aligned();
  T p_acc = T(0), u_acc = T(0);
  walk_chunk(chunk.len, [&](int64_t i) {
    T p_val[kILP];
    w.load(i, chunk.len, aligned);
    m.load(i, chunk.len, aligned);
    v.load(i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const T p = w.template get<T>(k);
      T mk = m.template get<T>(k), vk = v.template get<T>(k);
      lamb_moments<T, GRAD_MULT, ADAM_W>(p, w.template grad<T>(k), mk, vk, s);
      p_val[k] = p;
      m.set(k, mk);
      v.set(k, vk);
    }
    m.store(i, chunk.len, aligned, scratch, true);
    v.store(i, chunk.len, aligned, scratch, true);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k >= chunk.len) break;  // past the end: nothing to add to the sums
      const T u = lamb_direction<T, ADAM_W>(p_val[k], m.template stored<T>(k), v.template stored<T>(k), s);
      p_acc += p_val[k] * p_val[k];
      u_acc += u * u;
    }
  });
  int nan = 0;
  const T p_total = block_reduce<T, false>(p_acc, nan);
  __syncthreads();  // block_reduce's shared arrays are reused
  const T u_total = block_reduce<T, false>(u_acc, nan);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = double(p_total);
    partials[tt.n_chunks + blockIdx.x] = double(u_total);
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool ADAM_W, bool SR>
__global__ void __launch_bounds__(kThreads) apply_kernel(TensorTable tt, LambHyper h, const float* ratio) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) return;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const LambScalars<T> s = block_scalars<T>(tt, h, chunk.tensor);
  const T r = T(ratio[chunk.tensor]);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, chunk.tensor) : 0u;
  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, chunk.tensor, chunk.start);
  StatePack<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, chunk.tensor, chunk.start);  // read only
  StatePack<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, chunk.tensor, chunk.start);
  const bool aligned = w.aligned() && m.aligned() && v.aligned();
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    w.load(i, chunk.len, aligned);
    m.load(i, chunk.len, aligned);
    v.load(i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      p = p - lamb_direction<T, ADAM_W>(p, m.template get<T>(k), v.template get<T>(k), s) * r;
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
    }
    w.store(i, chunk.len, aligned);
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
void launch_moments(const TensorTable& tt, const LambHyper& h, double* partials, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  moments_kernel<P, S, MASTER, REM, GRAD_MULT, ADAM_W><<<grid, kThreads, 0, stream>>>(tt, h, partials);
}

template <typename P, typename S, bool MASTER>
struct MomentsOp {
  template <bool REM>
  static void run_rem(const TensorTable& tt, const LambHyper& h, double* partials, cudaStream_t stream) {
    const bool mult = h.grad_mult != nullptr;
    if (mult && h.adam_w_mode) launch_moments<P, S, MASTER, REM, true, true>(tt, h, partials, stream);
    else if (mult) launch_moments<P, S, MASTER, REM, true, false>(tt, h, partials, stream);
    else if (h.adam_w_mode) launch_moments<P, S, MASTER, REM, false, true>(tt, h, partials, stream);
    else launch_moments<P, S, MASTER, REM, false, false>(tt, h, partials, stream);
  }
  static void run(const TensorTable& tt, const LambHyper& h, double* partials, cudaStream_t stream) {
    with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_rem<decltype(rem)::value>(tt, h, partials, stream); });
  }
};

template <typename P, typename S, bool MASTER>
struct ApplyOp {
  template <bool REM, bool SR>
  static void run_sr(const TensorTable& tt, const LambHyper& h, const float* ratio, cudaStream_t stream) {
    const dim3 grid(unsigned(tt.n_chunks));
    if (h.adam_w_mode) apply_kernel<P, S, MASTER, REM, true, SR><<<grid, kThreads, 0, stream>>>(tt, h, ratio);
    else apply_kernel<P, S, MASTER, REM, false, SR><<<grid, kThreads, 0, stream>>>(tt, h, ratio);
  }
  static void run(const TensorTable& tt, const LambHyper& h, const float* ratio, cudaStream_t stream) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (h.sr.on) return run_sr<false, true>(tt, h, ratio, stream);
    }
    with_remainder<P, MASTER>(h.remainder,
                              [&](auto rem) { run_sr<decltype(rem)::value, false>(tt, h, ratio, stream); });
  }
};

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* lamb_moments_cuda(const TensorTable& tt, const int64_t* chunk_first, const LambHyper& h,
                              DType param_dtype, DType state_dtype, bool has_master, double* partials, double* p_sums,
                              double* u_sums, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  dispatch_storage<MomentsOp, true>(param_dtype, state_dtype, has_master, tt, h, partials, stream);
  const dim3 grid(unsigned(tt.n_tensors));
  combine_kernel<false><<<grid, kThreads, 0, stream>>>(partials, chunk_first, p_sums);
  combine_kernel<false><<<grid, kThreads, 0, stream>>>(partials + tt.n_chunks, chunk_first, u_sums);
  return last_error();
}

const char* lamb_apply_cuda(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype,
                            bool has_master, const float* ratio, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  dispatch_storage<ApplyOp, true>(param_dtype, state_dtype, has_master, tt, h, ratio,
                            static_cast<cudaStream_t>(stream_handle));
  return last_error();
}

}  // namespace fusedopt
