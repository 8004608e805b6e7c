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

// FP8: 0 none, else 1 + Fp8Format: also write the FP8 copy and the chunk's absmax.
// REM (MASTER, bf16 params): the master row holds int16 remainders (WeightPack).
template <typename P, typename S, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorTable tt, AdamWHyper h) {
  using T = typename MathOf<P>::type;
  constexpr Fp8Format kFormat = FP8 == 2 ? Fp8Format::kE5M2 : Fp8Format::kE4M3FN;
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip (all threads alike)

  const Chunk chunk = tt.chunk(blockIdx.x);
  const AdamWScalars<T> s = block_scalars<T>(tt, h, chunk.tensor);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, chunk.tensor) : 0u;

  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, chunk.tensor, chunk.start);
  const P* grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
  S* exp_avg = tt.ptr<S>(kRowExpAvg, chunk.tensor) + chunk.start;
  S* exp_avg_sq = tt.ptr<S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
  S* max_exp_avg_sq = AMSGRAD ? tt.ptr<S>(kRowMaxExpAvgSq, chunk.tensor) + chunk.start : nullptr;
  fp8* fp8_copy = FP8 ? tt.ptr<fp8>(kRowFp8, chunk.tensor) + chunk.start : nullptr;
  const float fp8_scale = FP8 ? *tt.ptr<const float>(kRowFp8Scale, chunk.tensor) : 0.0f;
  float amax = 0.0f;
  int nan = 0;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(exp_avg_sq) && (!AMSGRAD || cuda::is_aligned(max_exp_avg_sq)) &&
                       (!FP8 || cuda::is_aligned(fp8_copy));

  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S m_in[kILP], v_in[kILP], vmax_in[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_in, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(v_in, exp_avg_sq, i, chunk.len, aligned);
    if (AMSGRAD) cuda::load_pack(vmax_in, max_exp_avg_sq, i, chunk.len, aligned);

    S m_out[kILP], v_out[kILP], vmax_out[kILP];
    fp8 fp8_out[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T m = to_math(m_in[k]);
      T v = to_math(v_in[k]);
      T vmax = AMSGRAD ? T(to_math(vmax_in[k])) : T(0);
      adamw_element<T, AMSGRAD, GRAD_MULT>(p, T(to_math(g_in[k])), m, v, vmax, s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      if constexpr (FP8 != 0) {
        const float x = float(p);
        fp8_out[k] = cast_fp8<kFormat>(x, fp8_scale);
        if (i + k < chunk.len) {  // lanes past the end hold zeros' updates: not part of the tensor
          nan |= int(x != x);
          amax = absmax_step(amax, x);
        }
      }
      m_out[k] = Store<S>::from(m);
      v_out[k] = Store<S>::from(v);
      if (AMSGRAD) vmax_out[k] = Store<S>::from(vmax);
    }
    w.store(i, chunk.len, aligned);
    cuda::store_pack(exp_avg, m_out, i, chunk.len, aligned);
    cuda::store_pack(exp_avg_sq, v_out, i, chunk.len, aligned);
    if (AMSGRAD) cuda::store_pack(max_exp_avg_sq, vmax_out, i, chunk.len, aligned);
    if (FP8) cuda::store_pack(fp8_copy, fp8_out, i, chunk.len, aligned);
  }
  if constexpr (FP8 != 0) {
    const float total = cuda::block_reduce<float, true>(amax, nan);
    if (threadIdx.x == 0) h.fp8.partials[blockIdx.x] = nan ? double(NAN) : double(total);
  }
}

// The same update with block-scaled FP8 moments (fp8_states.cuh: every
// thread runs every iteration; the new moments are encoded per block).
template <typename P, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
__global__ void __launch_bounds__(kThreads) adamw_fp8_states_kernel(TensorTable tt, AdamWHyper h) {
  using T = typename MathOf<P>::type;
  constexpr Fp8Format kFormat = FP8 == 2 ? Fp8Format::kE5M2 : Fp8Format::kE4M3FN;
  if (h.found_inf && *h.found_inf != 0.0f) return;

  const Chunk chunk = tt.chunk(blockIdx.x);
  __shared__ uint32_t scratch[kThreads / 32];
  const AdamWScalars<T> s = block_scalars<T>(tt, h, chunk.tensor);
  const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, chunk.tensor) : 0u;
  const int64_t t = chunk.tensor;

  WeightPack<P, MASTER, REM> w(tt, kRowParam, kRowMaster, t, chunk.start);
  const P* grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
  uint8_t* exp_avg = tt.ptr<uint8_t>(kRowExpAvg, t) + chunk.start;
  uint8_t* exp_avg_sq = tt.ptr<uint8_t>(kRowExpAvgSq, t) + chunk.start;
  uint8_t* max_exp_avg_sq = AMSGRAD ? tt.ptr<uint8_t>(kRowMaxExpAvgSq, t) + chunk.start : nullptr;
  float* m_scales = tt.ptr<float>(kRowExpAvgScale, t) + chunk.start / kQBlock;
  float* v_scales = tt.ptr<float>(kRowExpAvgSqScale, t) + chunk.start / kQBlock;
  float* vmax_scales = AMSGRAD ? tt.ptr<float>(kRowMaxExpAvgSqScale, t) + chunk.start / kQBlock : nullptr;
  fp8* fp8_copy = FP8 ? tt.ptr<fp8>(kRowFp8, t) + chunk.start : nullptr;
  const float fp8_scale = FP8 ? *tt.ptr<const float>(kRowFp8Scale, t) : 0.0f;
  float amax = 0.0f;
  int nan = 0;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(exp_avg) &&
                       cuda::is_aligned(exp_avg_sq) && (!AMSGRAD || cuda::is_aligned(max_exp_avg_sq)) &&
                       (!FP8 || cuda::is_aligned(fp8_copy));

  for (int64_t base = 0; base < chunk.len; base += int64_t(kThreads) * kILP) {
    const int64_t i = base + int64_t(threadIdx.x) * kILP, blk = i / kQBlock;
    const bool live = i < chunk.len;
    P g_in[kILP];
    uint8_t m_in[kILP], v_in[kILP], vmax_in[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(m_in, exp_avg, i, chunk.len, aligned);
    cuda::load_pack(v_in, exp_avg_sq, i, chunk.len, aligned);
    if (AMSGRAD) cuda::load_pack(vmax_in, max_exp_avg_sq, i, chunk.len, aligned);
    const float m_scale = live ? m_scales[blk] : 0.0f, v_scale = live ? v_scales[blk] : 0.0f;
    const float vmax_scale = AMSGRAD && live ? vmax_scales[blk] : 0.0f;

    float m_new[kILP], s_new[kILP], smax_new[kILP];
    fp8 fp8_out[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      T p = w.template get<T>(k);
      T m = T(q8_decode<false>(m_in[k], m_scale));
      T v = T(q8_decode<true>(v_in[k], v_scale));
      T vmax = AMSGRAD ? T(q8_decode<true>(vmax_in[k], vmax_scale)) : T(0);
      adamw_element<T, AMSGRAD, GRAD_MULT>(p, T(to_math(g_in[k])), m, v, vmax, s);
      w.template set<SR>(k, p, sr_key, chunk.start + i + k);
      m_new[k] = float(m);
      s_new[k] = sqrtf(float(v));
      smax_new[k] = AMSGRAD ? sqrtf(float(vmax)) : 0.0f;
      if constexpr (FP8 != 0) {
        const float x = float(p);
        fp8_out[k] = cast_fp8<kFormat>(x, fp8_scale);
        if (i + k < chunk.len) {
          nan |= int(x != x);
          amax = absmax_step(amax, x);
        }
      }
    }
    w.store(i, chunk.len, aligned);
    if (FP8) cuda::store_pack(fp8_copy, fp8_out, i, chunk.len, aligned);

    // every thread has read its block's old scales before the first call's barrier
    cuda::q8_store_group(exp_avg, m_scales, i, chunk.len, aligned, m_new, scratch);
    cuda::q8_store_group(exp_avg_sq, v_scales, i, chunk.len, aligned, s_new, scratch);
    if (AMSGRAD) cuda::q8_store_group(max_exp_avg_sq, vmax_scales, i, chunk.len, aligned, smax_new, scratch);
  }
  if constexpr (FP8 != 0) {
    const float total = cuda::block_reduce<float, true>(amax, nan);
    if (threadIdx.x == 0) h.fp8.partials[blockIdx.x] = nan ? double(NAN) : double(total);
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
void launch_one(const TensorTable& tt, const AdamWHyper& h, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  if constexpr (std::is_same<S, fp8>::value) {
    adamw_fp8_states_kernel<P, MASTER, REM, AMSGRAD, GRAD_MULT, SR, FP8><<<grid, kThreads, 0, stream>>>(tt, h);
  } else {
    adamw_kernel<P, S, MASTER, REM, AMSGRAD, GRAD_MULT, SR, FP8><<<grid, kThreads, 0, stream>>>(tt, h);
  }
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
