// Scaled FP8 casts on the CPU (include/fusedopt/fp8.h): one OpenMP region
// over the chunks of all tensors; each chunk casts its elements and keeps its
// absmax, and the chunk maxima are combined per tensor (a max: the order does
// not matter; any NaN makes the tensor's amax NaN, as torch's amax).
#include <cmath>
#include <vector>

#include "fp8_cast.h"
#include "parallel.h"

namespace fusedopt {
namespace {

template <typename S, Fp8Format F>
void cast_chunks(const TensorTable& tt, const float* scales, float* partial, int num_threads) {
  parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start, len = chunk.len;
    const S* __restrict__ x = tt.ptr<const S>(kFp8RowInput, t) + begin;
    fp8* __restrict__ y = tt.ptr<fp8>(kFp8RowOutput, t) + begin;
    const float scale = scales[t];
    partial[c] = bits_to_float(cast_fp8_span<F>(x, y, len, scale, 0u));
  });
}

template <typename S>
void cast_format(const TensorTable& tt, Fp8Format format, const float* scales, float* partial, int num_threads) {
  if (format == Fp8Format::kE4M3FN) cast_chunks<S, Fp8Format::kE4M3FN>(tt, scales, partial, num_threads);
  else cast_chunks<S, Fp8Format::kE5M2>(tt, scales, partial, num_threads);
}

}  // namespace

void cast_fp8_cpu(const TensorTable& tt, DType input_dtype, Fp8Format format, const float* scales, double* amax,
                  int num_threads) {
  std::vector<float> partial(size_t(tt.n_chunks));
  switch (input_dtype) {
    case DType::kFloat32: cast_format<float>(tt, format, scales, partial.data(), num_threads); break;
    case DType::kBFloat16: cast_format<bf16>(tt, format, scales, partial.data(), num_threads); break;
    case DType::kFloat16: cast_format<fp16>(tt, format, scales, partial.data(), num_threads); break;
    case DType::kFloat64: break;  // refused by the binding
  }
  std::vector<float> out(size_t(tt.n_tensors), 0.0f);
  for (int64_t c = 0; c < tt.n_chunks; ++c) {
    float& o = out[size_t(tt.chunk_tensor[c])];
    o = absmax_step(o, partial[size_t(c)]);
  }
  for (int64_t t = 0; t < tt.n_tensors; ++t) amax[t] = double(out[size_t(t)]);
}

void fp8_delayed_scaling_cpu(const double* amax, float* history, float* scales, float* scale_inv,
                             int64_t inv_stride, int64_t n, int64_t len, float fp8_max, int margin) {
  const float divisor = std::ldexp(1.0f, margin);
  for (int64_t t = 0; t < n; ++t)
    fp8_delayed_scaling_one(amax[t], history + t * len, len, scales + t, scale_inv + t * inv_stride, fp8_max,
                            divisor);
}

}  // namespace fusedopt
