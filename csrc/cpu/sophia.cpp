// SophiaG on the CPU (include/fusedopt/sophia.h): one OpenMP region over the
// chunks of every tensor, per step and per Hessian update.
#include <vector>

#include "fp8_blocks.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/sophia.h"
#include "parallel.h"
#include "weights.h"

namespace fusedopt {
namespace {

// S: the states' storage (fp8: block-scaled, StateBlock: walked in blocks;
// the hessian, kept as its sqrt, is only read here).
template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
void step_chunks(const TensorTable& tt, const SophiaHyper& h, int num_threads) {
  using T = typename MathOf<P>::type;
  for (int64_t t = 0; t < tt.n_tensors; ++t) *tt.ptr<float>(kRowStep, t) += 1.0f;  // SophiaG keeps a count only
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  constexpr int64_t kBlock = StateBlock<S, false>::kFp8 ? kQBlock : 0;  // 0: the chunk in one loop
  parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
    const int64_t t = chunk.tensor, len = chunk.len;
    const Weights<P, MASTER, REM, SR> w(tt, kRowParam, kRowMaster, t, chunk.start, h.sr.seed);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
    StateBlock<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, chunk.start);
    StateBlock<S, true> hess(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, chunk.start);
    for (int64_t b0 = 0; b0 < len; b0 += kBlock ? kBlock : len) {
      const int64_t b1 = kBlock && b0 + kBlock < len ? b0 + kBlock : len;
      const auto mb = m.block(b0), hb = hess.block(b0);
#pragma omp simd
      for (int64_t i = 0; i < b1 - b0; ++i) {
        const int64_t e = b0 + i;
        T p = w.template load<T>(e);
        T mi = mb.template get<T>(i);
        sophia_element<T, GRAD_MULT>(p, T(to_math(grad[e])), mi, hb.template get<T>(i), s);
        w.store(e, p);
        mb.set(i, mi);
      }
      m.end_block(b0, b1 - b0);
    }
  });
}

template <typename P, typename S, bool MASTER>
struct StepOp {
  template <bool REM, bool SR>
  static void run_sr(const TensorTable& tt, const SophiaHyper& h, int n) {
    if (h.grad_mult) step_chunks<P, S, MASTER, REM, true, SR>(tt, h, n);
    else step_chunks<P, S, MASTER, REM, false, SR>(tt, h, n);
  }
  static void run(const TensorTable& tt, const SophiaHyper& h, int n) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (h.sr.on) return run_sr<false, true>(tt, h, n);
    }
    with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_sr<decltype(rem)::value, false>(tt, h, n); });
  }
};

template <typename P, typename S, bool MASTER>
struct HessianOp {
  static void run(const TensorTable& tt, double beta2, int num_threads) {
    using T = typename MathOf<P>::type;
    const T b2 = T(beta2), omb2 = T(1.0 - beta2);
    constexpr int64_t kBlock = StateBlock<S, true>::kFp8 ? kQBlock : 0;  // 0: the chunk in one loop
    parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
      const int64_t len = chunk.len;
      const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
      StateBlock<S, true> hess(tt, kRowExpAvgSq, kRowExpAvgSqScale, chunk.tensor, chunk.start);
      for (int64_t b0 = 0; b0 < len; b0 += kBlock ? kBlock : len) {
        const int64_t b1 = kBlock && b0 + kBlock < len ? b0 + kBlock : len;
        const auto hb = hess.block(b0);
#pragma omp simd
        for (int64_t i = 0; i < b1 - b0; ++i)
          hb.set(i, sophia_hessian(hb.template get<T>(i), T(to_math(grad[b0 + i])), b2, omb2));
        hess.end_block(b0, b1 - b0);
      }
    });
  }
};

}  // namespace

void sophia_cpu(const TensorTable& tt, const SophiaHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step, steps too
  dispatch_storage<StepOp, true>(param_dtype, state_dtype, has_master, tt, h, num_threads);
}

void sophia_hessian_cpu(const TensorTable& tt, double beta2, DType param_dtype, DType state_dtype, bool has_master,
                        int num_threads) {
  dispatch_storage<HessianOp, true>(param_dtype, state_dtype, has_master, tt, beta2, num_threads);
}

}  // namespace fusedopt
