// SophiaG on the CPU (include/fusedopt/sophia.h): one OpenMP region over the
// chunks of every tensor, per step and per Hessian update.
#include <vector>

#include "fusedopt/dispatch.h"
#include "fusedopt/sophia.h"
#include "parallel.h"

namespace fusedopt {
namespace {

template <typename P, typename S, bool MASTER, bool GRAD_MULT, bool SR>
void step_chunks(const TensorTable& tt, const SophiaHyper& h, int num_threads) {
  using T = typename MathOf<P>::type;
  for (int64_t t = 0; t < tt.n_tensors; ++t) *tt.ptr<float>(kRowStep, t) += 1.0f;  // SophiaG keeps a count only
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    const uint32_t sr_key = SR ? sr_tensor_key(h.sr.seed, t) : 0u;
    P* __restrict__ param = tt.ptr<P>(kRowParam, t) + chunk.start;
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
    S* __restrict__ exp_avg = tt.ptr<S>(kRowExpAvg, t) + chunk.start;
    const S* __restrict__ hessian = tt.ptr<const S>(kRowExpAvgSq, t) + chunk.start;
    float* __restrict__ master = MASTER ? tt.ptr<float>(kRowMaster, t) + chunk.start : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < chunk.len; ++i) {
      T p = MASTER ? T(master[i]) : T(to_math(param[i]));
      T m = to_math(exp_avg[i]);
      sophia_element<T, GRAD_MULT>(p, T(to_math(grad[i])), m, T(to_math(hessian[i])), s);
      if (MASTER) master[i] = float(p);
      param[i] = store_param<P, SR>(p, sr_key, chunk.start + i);
      exp_avg[i] = Store<S>::from(m);
    }
  });
}

template <typename P, typename S, bool MASTER>
struct StepOp {
  template <bool SR>
  static void run_sr(const TensorTable& tt, const SophiaHyper& h, int n) {
    if (h.grad_mult) step_chunks<P, S, MASTER, true, SR>(tt, h, n);
    else step_chunks<P, S, MASTER, false, SR>(tt, h, n);
  }
  static void run(const TensorTable& tt, const SophiaHyper& h, int n) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (h.sr.on) return run_sr<true>(tt, h, n);
    }
    run_sr<false>(tt, h, n);
  }
};

template <typename P, typename S, bool MASTER>
struct HessianOp {
  static void run(const TensorTable& tt, double beta2, int num_threads) {
    using T = typename MathOf<P>::type;
    const T b2 = T(beta2), omb2 = T(1.0 - beta2);
    parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
      const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
      S* __restrict__ hessian = tt.ptr<S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
#pragma omp simd
      for (int64_t i = 0; i < chunk.len; ++i)
        hessian[i] = Store<S>::from(sophia_hessian(T(to_math(hessian[i])), T(to_math(grad[i])), b2, omb2));
    });
  }
};

}  // namespace

void sophia_cpu(const TensorTable& tt, const SophiaHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step, steps too
  dispatch_storage<StepOp>(param_dtype, state_dtype, has_master, tt, h, num_threads);
}

void sophia_hessian_cpu(const TensorTable& tt, double beta2, DType param_dtype, DType state_dtype, bool has_master,
                        int num_threads) {
  dispatch_storage<HessianOp>(param_dtype, state_dtype, has_master, tt, beta2, num_threads);
}

}  // namespace fusedopt
