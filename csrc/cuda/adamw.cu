// AdamW on CUDA: one launch per bucket, one thread block per chunk
// (multi_tensor.cuh), the shared per-element update from
// include/fusedopt/adamw.h. Everything that changes between steps (lr when it
// is a tensor, each tensor's step, grad_mult, found_inf) is read from device
// memory, so the launch can be captured in a CUDA graph. No torch headers.
#include <cuda_runtime.h>

#include "fusedopt/adamw.h"
#include "fusedopt/dispatch.h"
#include "fp8_states.cuh"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

// The scalars of the block's tensor, computed once per block by thread 0 (double-precision pow is not
// free) and shared; every thread must call it.
template <typename T>
__device__ __forceinline__ AdamWScalars<T> block_scalars(const TensorTable& tt, const AdamWHyper& h, int64_t t) {
  __shared__ AdamWScalars<T> shared_scalars;
  if (threadIdx.x == 0) {
    const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
    shared_scalars = adamw_scalars<T>(h, lr, double(*tt.ptr<const float>(kRowStep, t)));
  }
  __syncthreads();
  return shared_scalars;
}

// S: the moments' storage (fp8: block-scaled, StatePack). FP8: 0 none, else
// 1 + Fp8Format: also write the FP8 weight copy and the chunk's absmax.
// REM (MASTER, bf16 params): the master row holds int16 remainders (WeightPack).
template <typename P, typename S, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorTable tt, AdamWHyper h) {
  using T = typename MathOf<P>::type;
  constexpr Fp8Format kFormat = FP8 == 2 ? Fp8Format::kE5M2 : Fp8Format::kE4M3FN;
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip (all threads alike)

  __shared__ uint32_t scratch[kThreads / 32];
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const AdamWScalars<T> s = block_scalars<T>(tt, h, t);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, t) : 0u;

  UpdatePack<P, MASTER, REM> w(tt, t, chunk.start);
  StatePack<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, chunk.start);
  StatePack<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, chunk.start);
  StatePack<S, true> vmax(tt, AMSGRAD ? kRowMaxExpAvgSq : kRowExpAvgSq,  // (used only with AMSGRAD)
                          AMSGRAD ? kRowMaxExpAvgSqScale : kRowExpAvgSqScale, t, chunk.start);
  fp8* fp8_copy = FP8 ? tt.ptr<fp8>(kRowFp8, t) + chunk.start : nullptr;
  const float fp8_scale = FP8 ? *tt.ptr<const float>(kRowFp8Scale, t) : 0.0f;
  float amax = 0.0f;
  int nan = 0;
  const bool aligned = w.aligned() && m.aligned() && v.aligned() &&
                       (!AMSGRAD || vmax.aligned()) && (!FP8 || cuda::is_aligned(fp8_copy));

  walk_chunk(chunk.len, [&](int64_t i) {
    w.load(i, chunk.len, aligned);
    m.load(i, chunk.len, aligned);
    v.load(i, chunk.len, aligned);
    if (AMSGRAD) vmax.load(i, chunk.len, aligned);

    fp8 fp8_out[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T mk = m.template get<T>(k), vk = v.template get<T>(k);
      T vmaxk = AMSGRAD ? vmax.template get<T>(k) : T(0);
      adamw_element<T, AMSGRAD, GRAD_MULT>(p, w.template grad<T>(k), mk, vk, vmaxk, s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      m.set(k, mk);
      v.set(k, vk);
      if (AMSGRAD) vmax.set(k, vmaxk);
      if constexpr (FP8 != 0) {
        const float x = float(p);
        fp8_out[k] = cast_fp8<kFormat>(x, fp8_scale);
        if (i + k < chunk.len) {  // lanes past the end hold zeros' updates: not part of the tensor
          nan |= int(x != x);
          amax = absmax_step(amax, x);
        }
      }
    }
    w.store(i, chunk.len, aligned);
    if (FP8) cuda::store_pack(fp8_copy, fp8_out, i, chunk.len, aligned);
    m.store(i, chunk.len, aligned, scratch);
    v.store(i, chunk.len, aligned, scratch);
    if (AMSGRAD) vmax.store(i, chunk.len, aligned, scratch);
  });
  if constexpr (FP8 != 0) {
    const float total = cuda::block_reduce<float, true>(amax, nan);
    if (threadIdx.x == 0) h.fp8.partials[blockIdx.x] = nan ? double(NAN) : double(total);
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
void launch_one(const TensorTable& tt, const AdamWHyper& h, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  adamw_kernel<P, S, MASTER, REM, AMSGRAD, GRAD_MULT, SR, FP8><<<grid, kThreads, 0, stream>>>(tt, h);
}

template <typename P, typename S, bool MASTER, bool REM, bool SR, int FP8>
void launch_adamw(const TensorTable& tt, const AdamWHyper& h, cudaStream_t stream) {
  const bool mult = h.grad_mult != nullptr;
  if (h.amsgrad && mult) launch_one<P, S, MASTER, REM, true, true, SR, FP8>(tt, h, stream);
  else if (h.amsgrad) launch_one<P, S, MASTER, REM, true, false, SR, FP8>(tt, h, stream);
  else if (mult) launch_one<P, S, MASTER, REM, false, true, SR, FP8>(tt, h, stream);
  else launch_one<P, S, MASTER, REM, false, false, SR, FP8>(tt, h, stream);
}

template <typename P, typename S, bool MASTER, bool REM>
void launch_storage(const TensorTable& tt, const AdamWHyper& h, cudaStream_t stream) {
  if constexpr (kStochasticRoundable<P, MASTER>) {
    if (h.sr.on) return launch_adamw<P, S, MASTER, REM, true, 0>(tt, h, stream);
  }
  if constexpr (kFp8Copyable<P, MASTER>) {
    if (h.fp8.on && h.fp8.format == Fp8Format::kE4M3FN)
      return launch_adamw<P, S, MASTER, REM, false, 1>(tt, h, stream);
    if (h.fp8.on) return launch_adamw<P, S, MASTER, REM, false, 2>(tt, h, stream);
  }
  launch_adamw<P, S, MASTER, REM, false, 0>(tt, h, stream);
}

template <typename P, typename S, bool MASTER>
struct AdamWOp {
  static void run(const TensorTable& tt, const AdamWHyper& h, cudaStream_t stream) {
    with_remainder<P, MASTER>(h.remainder,
                              [&](auto rem) { launch_storage<P, S, MASTER, decltype(rem)::value>(tt, h, stream); });
  }
};

}  // namespace

const char* adamw_cuda(const TensorTable& tt, const AdamWHyper& h, DType param_dtype, DType state_dtype,
                       bool has_master, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  if (tt.n_chunks > 0x7FFFFFFF) return "fusedopt: too many chunks for one launch";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  dispatch_storage<AdamWOp, true>(param_dtype, state_dtype, has_master, tt, h, stream);
  if (h.fp8.on) {
    cuda::combine_kernel<true><<<dim3(unsigned(tt.n_tensors)), kThreads, 0, stream>>>(h.fp8.partials,
                                                                                     h.fp8.chunk_first, h.fp8.amax);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fusedopt
