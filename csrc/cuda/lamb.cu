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

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
__global__ void __launch_bounds__(kThreads) moments_kernel(TensorTable tt, LambHyper h, double* partials) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) {  // GradScaler found inf/NaN: nothing moves
    if (threadIdx.x == 0) partials[blockIdx.x] = partials[tt.n_chunks + blockIdx.x] = 0.0;
    return;
  }
  const Chunk chunk = tt.chunk(blockIdx.x);
  const LambScalars<T> s = block_scalars<T>(tt, h, chunk.tensor);
  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, chunk.tensor, chunk.start);  // read only
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  S* exp_avg = tt.ptr<S>(kRowExpAvg, chunk.tensor) + chunk.start;
  S* exp_avg_sq = tt.ptr<S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(exp_avg_sq);
  T p_acc = T(0), u_acc = T(0);
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S m_io[kILP], v_io[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_io, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(v_io, exp_avg_sq, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k >= chunk.len) break;  // past the end: nothing to add to the sums
      const T p = w.template get<T>(k);
      T m = to_math(m_io[k]);
      T v = to_math(v_io[k]);
      lamb_moments<T, GRAD_MULT, ADAM_W>(p, T(to_math(g_in[k])), m, v, s);
      m_io[k] = Store<S>::from(m);
      v_io[k] = Store<S>::from(v);
      const T u = lamb_direction<T, ADAM_W>(p, T(to_math(m_io[k])), T(to_math(v_io[k])), s);  // as stored
      p_acc += p * p;
      u_acc += u * u;
    }
    cuda::store_pack(exp_avg, m_io, i, chunk.len, aligned);
    cuda::store_pack(exp_avg_sq, v_io, i, chunk.len, aligned);
  }
  int nan = 0;
  const T p_total = block_reduce<T, false>(p_acc, nan);
  __syncthreads();  // block_reduce's shared arrays are reused
  const T u_total = block_reduce<T, false>(u_acc, nan);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = double(p_total);
    partials[tt.n_chunks + blockIdx.x] = double(u_total);
  }
}

// Block-scaled FP8 states (fp8_states.cuh): m and sqrt(v) encoded per block
// and u formed from them as stored. Every thread runs every iteration.
template <typename P, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
__global__ void __launch_bounds__(kThreads) moments_fp8_states_kernel(TensorTable tt, LambHyper h, double* partials) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) {
    if (threadIdx.x == 0) partials[blockIdx.x] = partials[tt.n_chunks + blockIdx.x] = 0.0;
    return;
  }
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const LambScalars<T> s = block_scalars<T>(tt, h, t);
  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, t, chunk.start);  // read only
  const P* grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
  uint8_t* exp_avg = tt.ptr<uint8_t>(kRowExpAvg, t) + chunk.start;
  uint8_t* exp_avg_sq = tt.ptr<uint8_t>(kRowExpAvgSq, t) + chunk.start;
  float* m_scales = tt.ptr<float>(kRowExpAvgScale, t) + chunk.start / kQBlock;
  float* v_scales = tt.ptr<float>(kRowExpAvgSqScale, t) + chunk.start / kQBlock;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(exp_avg_sq);
  T p_acc = T(0), u_acc = T(0);
  for (int64_t base = 0; base < chunk.len; base += int64_t(kThreads) * kILP) {
    const int64_t i = base + int64_t(threadIdx.x) * kILP;
    const bool live = i < chunk.len;
    P g_in[kILP];
    uint8_t m_in[kILP], v_in[kILP];
    float m_new[kILP], s_new[kILP], m_stored[kILP], s_stored[kILP];
    T p_val[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_in, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(v_in, exp_avg_sq, i, chunk.len, aligned);
    const float m_scale = live ? m_scales[i / kQBlock] : 0.0f, v_scale = live ? v_scales[i / kQBlock] : 0.0f;
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const T p = w.template get<T>(k);
      T m = T(q8_decode<false>(m_in[k], m_scale));
      T v = T(q8_decode<true>(v_in[k], v_scale));
      lamb_moments<T, GRAD_MULT, ADAM_W>(p, T(to_math(g_in[k])), m, v, s);
      p_val[k] = p;
      m_new[k] = float(m);
      s_new[k] = sqrtf(float(v));
    }
    cuda::q8_store_group(exp_avg, m_scales, i, chunk.len, aligned, m_new, scratch, m_stored);
    cuda::q8_store_group(exp_avg_sq, v_scales, i, chunk.len, aligned, s_new, scratch, s_stored);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k >= chunk.len) break;  // past the end: nothing to add to the sums
      const T u = lamb_direction<T, ADAM_W>(p_val[k], T(m_stored[k]), T(s_stored[k] * s_stored[k]), s);
      p_acc += p_val[k] * p_val[k];
      u_acc += u * u;
    }
  }
  int nan = 0;
  const T p_total = block_reduce<T, false>(p_acc, nan);
  __syncthreads();
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
  const S* exp_avg = tt.ptr<const S>(kRowExpAvg, chunk.tensor) + chunk.start;
  const S* exp_avg_sq = tt.ptr<const S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  const bool aligned = w.aligned() && cuda::is_aligned(exp_avg) && cuda::is_aligned(exp_avg_sq);
  constexpr bool kFp8 = std::is_same<S, fp8>::value;  // block-scaled FP8 states: decoded with their scales
  const float* m_scales = kFp8 ? tt.ptr<const float>(kRowExpAvgScale, chunk.tensor) + chunk.start / kQBlock : nullptr;
  const float* v_scales =
      kFp8 ? tt.ptr<const float>(kRowExpAvgSqScale, chunk.tensor) + chunk.start / kQBlock : nullptr;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    S m_in[kILP], v_in[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(m_in, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(v_in, exp_avg_sq, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T m, v;
      if constexpr (kFp8) {  // kILP elements from a multiple of kILP: one block
        m = T(q8_decode<false>(m_in[k].bits, m_scales[i / kQBlock]));
        v = T(q8_decode<true>(v_in[k].bits, v_scales[i / kQBlock]));
      } else {
        m = T(to_math(m_in[k]));
        v = T(to_math(v_in[k]));
      }
      p = p - lamb_direction<T, ADAM_W>(p, m, v, s) * r;
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
    }
    w.store(i, chunk.len, aligned);
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
void launch_moments(const TensorTable& tt, const LambHyper& h, double* partials, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  if constexpr (std::is_same<S, fp8>::value) {
    moments_fp8_states_kernel<P, MASTER, REM, GRAD_MULT, ADAM_W><<<grid, kThreads, 0, stream>>>(tt, h, partials);
  } else {
    moments_kernel<P, S, MASTER, REM, GRAD_MULT, ADAM_W><<<grid, kThreads, 0, stream>>>(tt, h, partials);
  }
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
