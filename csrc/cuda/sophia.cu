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

// S: the states' storage (fp8: block-scaled, StatePack; the hessian kept as its sqrt).
template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
__global__ void __launch_bounds__(kThreads) step_kernel(TensorTable tt, SophiaHyper h) {
  using T = typename MathOf<P>::type;
  if (h.found_inf && *h.found_inf != 0.0f) return;
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, t) : 0u;
  UpdatePack<P, MASTER, REM> w(tt, t, chunk.start);
  StatePack<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, chunk.start);
  StatePack<S, true> hess(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, chunk.start);  // read only
  const bool aligned = w.aligned() && m.aligned() && hess.aligned();
  walk_chunk(chunk.len, [&](int64_t i) {
    w.load(i, chunk.len, aligned);
    m.load(i, chunk.len, aligned);
    hess.load(i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T mk = m.template get<T>(k);
      sophia_element<T, GRAD_MULT>(p, w.template grad<T>(k), mk, hess.template get<T>(k), s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      m.set(k, mk);
    }
    w.store(i, chunk.len, aligned);
    m.store(i, chunk.len, aligned, scratch);
  });
}

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) hessian_kernel(TensorTable tt, double beta2) {
  using T = typename MathOf<P>::type;
  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  StatePack<S, true> hess(tt, kRowExpAvgSq, kRowExpAvgSqScale, chunk.tensor, chunk.start);
  const bool aligned = cuda::is_aligned(grad) && hess.aligned();
  const T b2 = T(beta2), omb2 = T(1.0 - beta2);
  walk_chunk(chunk.len, [&](int64_t i) {
    P g_in[kILP];
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    hess.load(i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      hess.set(k, sophia_hessian(hess.template get<T>(k), T(to_math(g_in[k])), b2, omb2));
    hess.store(i, chunk.len, aligned, scratch);
  });
}

template <typename P, typename S, bool MASTER>
struct StepOp {
  template <bool REM, bool SR>
  static void run_sr(const TensorTable& tt, const SophiaHyper& h, cudaStream_t stream) {
    const dim3 grid(unsigned(tt.n_chunks));
    if (h.grad_mult) step_kernel<P, S, MASTER, REM, true, SR><<<grid, kThreads, 0, stream>>>(tt, h);
    else step_kernel<P, S, MASTER, REM, false, SR><<<grid, kThreads, 0, stream>>>(tt, h);
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
    hessian_kernel<P, S><<<dim3(unsigned(tt.n_chunks)), kThreads, 0, stream>>>(tt, beta2);
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
