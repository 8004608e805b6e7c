// Norm reductions and scaling on CUDA (include/fusedopt/norms.h). Level one:
// one block per chunk reduces its elements (fixed per-thread order, then a
// fixed shared-memory tree) to a double partial; level two: one block per
// tensor reduces that tensor's partials the same way. Deterministic, no float
// atomics. No torch headers.
#include <cuda_runtime.h>

#include <math.h>

#include "fusedopt/norms.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

template <typename S, NormKind K>
__global__ void __launch_bounds__(kThreads) partials_kernel(TensorTable tt, double p, double* partials) {
  using T = typename MathOf<S>::type;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const S* x = tt.ptr<const S>(0, chunk.tensor) + chunk.start;
  const bool aligned = cuda::is_aligned(x);
  const T pt = T(p);
  double acc = 0.0;  // terms in T (they overflow and underflow as torch's do), sums in double as on the CPU
  int nan = 0;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    S in[kILP];
    cuda::load_pack(in, x, i, chunk.len, aligned);  // past the end: zeros, which add nothing
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const T v = to_math(in[k]);
      nan |= int(v != v);
      const T term = norm_term<K, T>(v, pt);
      acc = K == NormKind::kInf ? (double(term) > acc ? double(term) : acc) : acc + double(term);
    }
  }
  const double total = block_reduce<double, K == NormKind::kInf>(acc, nan);
  if (threadIdx.x == 0) partials[blockIdx.x] = nan ? double(NAN) : total;
}

template <typename S>
__global__ void __launch_bounds__(kThreads) scale_kernel(TensorTable tt, const double* factor) {
  using T = typename MathOf<S>::type;
  const Chunk chunk = tt.chunk(blockIdx.x);
  S* x = tt.ptr<S>(0, chunk.tensor) + chunk.start;
  const bool aligned = cuda::is_aligned(x);
  const T f = T(*factor);
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    S v[kILP];
    cuda::load_pack(v, x, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) v[k] = Store<S>::from(T(to_math(v[k])) * f);
    cuda::store_pack(x, v, i, chunk.len, aligned);
  }
}

template <typename S>
void launch_partials(const TensorTable& tt, double p, double* partials, cudaStream_t stream) {
  const dim3 grid(unsigned(tt.n_chunks));
  switch (norm_kind(p)) {
    case NormKind::kL1: partials_kernel<S, NormKind::kL1><<<grid, kThreads, 0, stream>>>(tt, p, partials); break;
    case NormKind::kL2: partials_kernel<S, NormKind::kL2><<<grid, kThreads, 0, stream>>>(tt, p, partials); break;
    case NormKind::kInf: partials_kernel<S, NormKind::kInf><<<grid, kThreads, 0, stream>>>(tt, p, partials); break;
    case NormKind::kGeneral:
      partials_kernel<S, NormKind::kGeneral><<<grid, kThreads, 0, stream>>>(tt, p, partials);
      break;
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* power_sums_cuda(const TensorTable& tt, const int64_t* chunk_first, DType dtype, double p,
                            double* partials, double* out, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case DType::kFloat32: launch_partials<float>(tt, p, partials, stream); break;
    case DType::kFloat64: launch_partials<double>(tt, p, partials, stream); break;
    case DType::kBFloat16: launch_partials<bf16>(tt, p, partials, stream); break;
    case DType::kFloat16: launch_partials<fp16>(tt, p, partials, stream); break;
  }
  const dim3 grid(unsigned(tt.n_tensors));
  if (norm_kind(p) == NormKind::kInf) combine_kernel<true><<<grid, kThreads, 0, stream>>>(partials, chunk_first, out);
  else combine_kernel<false><<<grid, kThreads, 0, stream>>>(partials, chunk_first, out);
  return last_error();
}

const char* scale_cuda(const TensorTable& tt, DType dtype, const double* factor, void* stream_handle) {
  if (tt.n_chunks == 0) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const dim3 grid(unsigned(tt.n_chunks));
  switch (dtype) {
    case DType::kFloat32: scale_kernel<float><<<grid, kThreads, 0, stream>>>(tt, factor); break;
    case DType::kFloat64: scale_kernel<double><<<grid, kThreads, 0, stream>>>(tt, factor); break;
    case DType::kBFloat16: scale_kernel<bf16><<<grid, kThreads, 0, stream>>>(tt, factor); break;
    case DType::kFloat16: scale_kernel<fp16><<<grid, kThreads, 0, stream>>>(tt, factor); break;
  }
  return last_error();
}

}  // namespace fusedopt
