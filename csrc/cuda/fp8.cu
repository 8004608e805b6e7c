// Scaled FP8 casts on CUDA (include/fusedopt/fp8.h): one block per chunk casts
// its elements and reduces their absmax (NaN-propagating) to a partial; one
// block per tensor combines a tensor's partials (multi_tensor.cuh). And the
// delayed-scaling update after a step that wrote FP8 copies, one thread per
// copy (torch ops take ~20 small launches for it). No torch headers.
#include <cmath>

#include <cuda_runtime.h>

#include "fusedopt/fp8.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

template <typename S, Fp8Format F>
__global__ void __launch_bounds__(kThreads) cast_kernel(TensorTable tt, const float* scales, double* partials) {
  const Chunk chunk = tt.chunk(blockIdx.x);
  const S* x = tt.ptr<const S>(kFp8RowInput, chunk.tensor) + chunk.start;
  fp8* y = tt.ptr<fp8>(kFp8RowOutput, chunk.tensor) + chunk.start;
  const bool aligned = cuda::is_aligned(x) && cuda::is_aligned(y);
  const float scale = scales[chunk.tensor];
  float mx = 0.0f;
  int nan = 0;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    S in[kILP];
    fp8 out[kILP];
    cuda::load_pack(in, x, i, chunk.len, aligned);  // past the end: zeros, which do not raise the max
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const float v = to_math(in[k]);
      out[k] = cast_fp8<F>(v, scale);
      nan |= int(v != v);
      mx = absmax_step(mx, v);
    }
    cuda::store_pack(y, out, i, chunk.len, aligned);
  }
  const float total = block_reduce<float, true>(mx, nan);
  if (threadIdx.x == 0) partials[blockIdx.x] = nan ? double(NAN) : double(total);
}

template <typename S>
void launch(const TensorTable& tt, Fp8Format format, const float* scales, double* partials, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  if (format == Fp8Format::kE4M3FN) {
    cast_kernel<S, Fp8Format::kE4M3FN><<<grid, kThreads, 0, stream>>>(tt, scales, partials);
  } else {
    cast_kernel<S, Fp8Format::kE5M2><<<grid, kThreads, 0, stream>>>(tt, scales, partials);
  }
}

__global__ void delayed_scaling_kernel(const double* amax, float* history, float* scales, float* scale_inv,
                                       int64_t inv_stride, int64_t n, int64_t len, float fp8_max, float divisor,
                                       const float* found_inf) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n || (found_inf != nullptr && *found_inf != 0.0f)) return;  // GradScaler skipped the step
  fp8_delayed_scaling_one(amax[t], history + t * len, len, scales + t, scale_inv + t * inv_stride, fp8_max, divisor);
}

}  // namespace

const char* fp8_delayed_scaling_cuda(const double* amax, float* history, float* scales, float* scale_inv,
                                     int64_t inv_stride, int64_t n, int64_t len, float fp8_max, int margin,
                                     const float* found_inf, void* stream_handle) {
  if (n == 0) return nullptr;
  constexpr int kBlock = 128;
  const float divisor = std::ldexp(1.0f, margin);
  delayed_scaling_kernel<<<dim3(unsigned((n + kBlock - 1) / kBlock)), kBlock, 0,
                           static_cast<cudaStream_t>(stream_handle)>>>(amax, history, scales, scale_inv, inv_stride,
                                                                        n, len, fp8_max, divisor, found_inf);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* cast_fp8_cuda(const TensorTable& tt, const int64_t* chunk_first, DType input_dtype, Fp8Format format,
                          const float* scales, double* partials, double* amax, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  switch (input_dtype) {
    case DType::kFloat32: launch<float>(tt, format, scales, partials, stream); break;
    case DType::kBFloat16: launch<bf16>(tt, format, scales, partials, stream); break;
    case DType::kFloat16: launch<fp16>(tt, format, scales, partials, stream); break;
    case DType::kFloat64: return "fusedopt: fp8 casts take fp32, bf16 or fp16 inputs";
  }
  combine_kernel<true><<<dim3(unsigned(tt.n_tensors)), kThreads, 0, stream>>>(partials, chunk_first, amax);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fusedopt
