// AdamW on the CPU: one OpenMP parallel region over the chunks of every tensor
// of the launch, and a SIMD loop over the elements of each chunk calling the
// shared per-element update (include/fusedopt/adamw.h). No torch headers.
#include <vector>

#include "fusedopt/adamw.h"

namespace fusedopt {
namespace {

template <typename P, typename S, bool MASTER, bool AMSGRAD>
void adamw_chunks(const TensorTable& tt, const AdamWHyper& h, int num_threads) {
  using T = typename MathOf<P>::type;
  // Per-tensor scalars once, before the parallel region: each tensor has its
  // own step count (params that skipped steps, or state loaded from elsewhere).
  const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
  const double grad_scale = h.grad_scale ? double(*h.grad_scale) : 1.0;
  std::vector<AdamWScalars<T>> scalars(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) {
    scalars[size_t(t)] = adamw_scalars<T>(h, lr, double(*tt.ptr<const float>(kAdamWStep, t)), grad_scale);
  }

#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t c = 0; c < tt.n_chunks; ++c) {
    const int64_t t = tt.chunk_tensor[c];
    const int64_t begin = tt.chunk_start[c];
    const int64_t remaining = tt.numel[t] - begin;
    const int64_t len = remaining < tt.chunk_size ? remaining : tt.chunk_size;
    const AdamWScalars<T> s = scalars[size_t(t)];

    P* __restrict__ param = tt.ptr<P>(kAdamWParam, t) + begin;
    const P* __restrict__ grad = tt.ptr<const P>(kAdamWGrad, t) + begin;
    S* __restrict__ exp_avg = tt.ptr<S>(kAdamWExpAvg, t) + begin;
    S* __restrict__ exp_avg_sq = tt.ptr<S>(kAdamWExpAvgSq, t) + begin;
    S* __restrict__ max_exp_avg_sq = AMSGRAD ? tt.ptr<S>(kAdamWMaxExpAvgSq, t) + begin : nullptr;
    float* __restrict__ master = MASTER ? tt.ptr<float>(kAdamWMaster, t) + begin : nullptr;

#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      T p = MASTER ? T(master[i]) : T(to_math(param[i]));
      T m = to_math(exp_avg[i]);
      T v = to_math(exp_avg_sq[i]);
      T vmax = AMSGRAD ? T(to_math(max_exp_avg_sq[i])) : T(0);
      adamw_element<T, AMSGRAD>(p, T(to_math(grad[i])), m, v, vmax, s);
      if (MASTER) master[i] = float(p);
      param[i] = Store<P>::from(p);
      exp_avg[i] = Store<S>::from(m);
      exp_avg_sq[i] = Store<S>::from(v);
      if (AMSGRAD) max_exp_avg_sq[i] = Store<S>::from(vmax);
    }
  }
}

template <typename P, typename S, bool MASTER>
void adamw_dispatch_amsgrad(const TensorTable& tt, const AdamWHyper& h, int num_threads) {
  if (h.amsgrad) adamw_chunks<P, S, MASTER, true>(tt, h, num_threads);
  else adamw_chunks<P, S, MASTER, false>(tt, h, num_threads);
}

template <typename P>
void adamw_dispatch_master(const TensorTable& tt, const AdamWHyper& h, bool has_master, int num_threads) {
  // Low-precision params keep their moments either in their own dtype (as
  // torch's fused AdamW does) or, with master weights, in fp32.
  if (has_master) adamw_dispatch_amsgrad<P, float, true>(tt, h, num_threads);
  else adamw_dispatch_amsgrad<P, P, false>(tt, h, num_threads);
}

}  // namespace

void adamw_cpu(const TensorTable& tt, const AdamWHyper& h, DType param_dtype, bool has_master,
               int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step
  if (tt.n_chunks == 0) return;
  switch (param_dtype) {
    case DType::kFloat32: adamw_dispatch_amsgrad<float, float, false>(tt, h, num_threads); break;
    case DType::kFloat64: adamw_dispatch_amsgrad<double, double, false>(tt, h, num_threads); break;
    case DType::kBFloat16: adamw_dispatch_master<bf16>(tt, h, has_master, num_threads); break;
    case DType::kFloat16: adamw_dispatch_master<fp16>(tt, h, has_master, num_threads); break;
  }
}

}  // namespace fusedopt
