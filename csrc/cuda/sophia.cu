// SophiaG on CUDA (include/fusedopt/sophia.h): one launch per bucket for the
// step and one for the Hessian update; a block per chunk, kILP elements per
// thread per iteration. lr (when a tensor), grad_mult and found_inf are read
// on the device. No torch headers.
#include <cuda_runtime.h>

#include "fp8_states.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/sophia.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
__global__ void __launch_bounds__(kThreads) step_kernel(TensorTable tt, SophiaHyper h) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) return;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, chunk.tensor) : 0u;
  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, chunk.tensor, chunk.start);
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  S* exp_avg = tt.ptr<S>(kRowExpAvg, chunk.tensor) + chunk.start;
  const S* hessian = tt.ptr<const S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(hessian);
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S m_io[kILP], h_in[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_io, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(h_in, hessian, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T m = to_math(m_io[k]);
      sophia_element<T, GRAD_MULT>(p, T(to_math(g_in[k])), m, T(to_math(h_in[k])), s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      m_io[k] = Store<S>::from(m);
    }
    w.store(i, chunk.len, aligned);
    cuda::store_pack(exp_avg, m_io, i, chunk.len, aligned);
  }
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) hessian_kernel(TensorTable tt, double beta2) {
  using T = typename MathOf<P>::type;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  S* hessian = tt.ptr<S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  const bool aligned = cuda::is_aligned(grad) && cuda::is_aligned(hessian);
  const T b2 = T(beta2), omb2 = T(1.0 - beta2);
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S h_io[kILP];
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(h_io, hessian, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) h_io[k] = Store<S>::from(sophia_hessian(T(to_math(h_io[k])), T(to_math(g_in[k])),
         b2, omb2));
    cuda::store_pack(hessian, h_io, i, chunk.len, aligned);
  }
}

// Block-scaled FP8 states (fp8_states.cuh): exp_avg decoded and re-encoded
// per block, the hessian (stored as sqrt) decoded. All threads run every iteration.
template <typename P, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
__global__ void __launch_bounds__(kThreads) step_fp8_states_kernel(TensorTable tt, SophiaHyper h) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) return;
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, t) : 0u;
  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, t, chunk.start);
  const P* grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
  uint8_t* exp_avg = tt.ptr<uint8_t>(kRowExpAvg, t) + chunk.start;
  const uint8_t* hessian = tt.ptr<const uint8_t>(kRowExpAvgSq, t) + chunk.start;
  float* m_scales = tt.ptr<float>(kRowExpAvgScale, t) + chunk.start / kQBlock;
  const float* h_scales = tt.ptr<const float>(kRowExpAvgSqScale, t) + chunk.start / kQBlock;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(hessian);
  for (int64_t base = 0; base < chunk.len; base += int64_t(kThreads) * kILP) {
    const int64_t i = base + int64_t(threadIdx.x) * kILP;
    const bool live = i < chunk.len;
    P g_in[kILP];
    uint8_t m_in[kILP], h_in[kILP];
    float m_new[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_in, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(h_in, hessian, i, chunk.len, aligned);
    const float m_scale = live ? m_scales[i / kQBlock] : 0.0f, h_scale = live ? h_scales[i / kQBlock] : 0.0f;
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T m = T(q8_decode<false>(m_in[k], m_scale));
      sophia_element<T, GRAD_MULT>(p, T(to_math(g_in[k])), m, T(q8_decode<true>(h_in[k], h_scale)), s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      m_new[k] = float(m);
    }
    w.store(i, chunk.len, aligned);
    cuda::q8_store_group(exp_avg, m_scales, i, chunk.len, aligned, m_new, scratch);
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads) hessian_fp8_states_kernel(TensorTable tt, double beta2) {
  using T = typename MathOf<P>::type;
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  uint8_t* hessian = tt.ptr<uint8_t>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  float* h_scales = tt.ptr<float>(kRowExpAvgSqScale, chunk.tensor) + chunk.start / kQBlock;
  const bool aligned = cuda::is_aligned(grad) && cuda::is_aligned(hessian);
  const T b2 = T(beta2), omb2 = T(1.0 - beta2);
  for (int64_t base = 0; base < chunk.len; base += int64_t(kThreads) * kILP) {
    const int64_t i = base + int64_t(threadIdx.x) * kILP;
    P g_in[kILP];
    uint8_t h_in[kILP];
    float s_new[kILP];
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(h_in, hessian, i, chunk.len, aligned);
    const float scale = i < chunk.len ? h_scales[i / kQBlock] : 0.0f;
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const T hh = sophia_hessian(T(q8_decode<true>(h_in[k], scale)), T(to_math(g_in[k])), b2, omb2);
      s_new[k] = sqrtf(float(hh));
    }
    cuda::q8_store_group(hessian, h_scales, i, chunk.len, aligned, s_new, scratch);
  }
}

template <typename P, typename S, bool MASTER>
struct StepOp {
  template <bool REM, bool SR>
  static void run_sr(const TensorTable& tt, const SophiaHyper& h, cudaStream_t stream) {
    const dim3 grid(unsigned(tt.n_chunks));
    if constexpr (std::is_same<S, fp8>::value) {
      if (h.grad_mult) step_fp8_states_kernel<P, MASTER, REM, true, SR><<<grid, kThreads, 0, stream>>>(tt, h);
      else step_fp8_states_kernel<P, MASTER, REM, false, SR><<<grid, kThreads, 0, stream>>>(tt, h);
    } else {
      if (h.grad_mult) step_kernel<P, S, MASTER, REM, true, SR><<<grid, kThreads, 0, stream>>>(tt, h);
      else step_kernel<P, S, MASTER, REM, false, SR><<<grid, kThreads, 0, stream>>>(tt, h);
    }
  }
  static void run(const TensorTable& tt, const SophiaHyper& h, cudaStream_t stream) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (h.sr.on) return run_sr<false, true>(tt, h, stream);
    }
    with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_sr<decltype(rem)::value, false>(tt, h, stream); });
  }
};

template <typename P, typename S, bool MASTER>
struct HessianOp {
  static void run(const TensorTable& tt, double beta2, cudaStream_t stream) {
    if constexpr (std::is_same<S, fp8>::value) {
      hessian_fp8_states_kernel<P><<<dim3(unsigned(tt.n_chunks)), kThreads, 0, stream>>>(tt, beta2);
    } else {
      hessian_kernel<P, S><<<dim3(unsigned(tt.n_chunks)), kThreads, 0, stream>>>(tt, beta2);
    }
  }
};

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* sophia_cuda(const TensorTable& tt, const SophiaHyper& h, DType param_dtype, DType state_dtype,
                        bool has_master, void* stream) {
  if (tt.n_chunks == 0) return nullptr;
  dispatch_storage<StepOp, true>(param_dtype, state_dtype, has_master, tt, h, static_cast<cudaStream_t>(stream));
  return last_error();
}

const char* sophia_hessian_cuda(const TensorTable& tt, double beta2, DType param_dtype, DType state_dtype,
                                bool has_master, void* stream) {
  if (tt.n_chunks == 0) return nullptr;
  dispatch_storage<HessianOp, true>(param_dtype, state_dtype, has_master, tt, beta2,
                                    static_cast<cudaStream_t>(stream));
  return last_error();
}

}  // namespace fusedopt
