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

// Block-scaled FP8 states (S = fp8, fp8_blocks.h): exp_avg is re-encoded
// block by block; the hessian (stored as sqrt) is only read here.
template <typename P, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
void step_chunks_fp8_states(const TensorTable& tt, const SophiaScalars<typename MathOf<P>::type>& s,
                            uint32_t sr_seed, int num_threads) {
  using T = typename MathOf<P>::type;
  parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start;
    const Weights<P, MASTER, REM, SR> w(tt, kRowParam, kRowMaster, t, begin, sr_seed);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + begin;
    const uint8_t* __restrict__ hessian = tt.ptr<const uint8_t>(kRowExpAvgSq, t) + begin;
    const float* __restrict__ h_scales = tt.ptr<const float>(kRowExpAvgSqScale, t) + begin / kQBlock;
    uint8_t* const q[1] = {tt.ptr<uint8_t>(kRowExpAvg, t) + begin};
    float* const scales[1] = {tt.ptr<float>(kRowExpAvgScale, t) + begin / kQBlock};
    q8_store_blocks<1>(chunk.len, q, scales, [&](int64_t b0, int64_t n, float (*out)[kQBlock]) {
      const float m_scale = scales[0][b0 / kQBlock], h_scale = h_scales[b0 / kQBlock];
      const uint8_t* __restrict__ m_in = q[0] + b0;
      float* __restrict__ m_out = out[0];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const int64_t e = b0 + i;
        T p = w.template load<T>(e);
        T m = T(q8_decode<false>(m_in[i], m_scale));
        sophia_element<T, GRAD_MULT>(p, T(to_math(grad[e])), m, T(q8_decode<true>(hessian[e], h_scale)), s);
        w.store(e, p);
        m_out[i] = float(m);
      }
    });
  });
}

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool SR>
void step_chunks(const TensorTable& tt, const SophiaHyper& h, int num_threads) {
  using T = typename MathOf<P>::type;
  for (int64_t t = 0; t < tt.n_tensors; ++t) *tt.ptr<float>(kRowStep, t) += 1.0f;  // SophiaG keeps a count only
  const SophiaScalars<T> s = sophia_scalars<T>(h, h.lr_ptr ? double(*h.lr_ptr) : h.lr);
  if constexpr (std::is_same<S, fp8>::value) {
    step_chunks_fp8_states<P, MASTER, REM, GRAD_MULT, SR>(tt, s, h.sr.seed, num_threads);
  } else {
  parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    const Weights<P, MASTER, REM, SR> w(tt, kRowParam, kRowMaster, t, chunk.start, h.sr.seed);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + chunk.start;
    S* __restrict__ exp_avg = tt.ptr<S>(kRowExpAvg, t) + chunk.start;
    const S* __restrict__ hessian = tt.ptr<const S>(kRowExpAvgSq, t) + chunk.start;
#pragma omp simd
    for (int64_t i = 0; i < chunk.len; ++i) {
      T p = w.template load<T>(i);
      T m = to_math(exp_avg[i]);
      sophia_element<T, GRAD_MULT>(p, T(to_math(grad[i])), m, T(to_math(hessian[i])), s);
      w.store(i, p);
      exp_avg[i] = Store<S>::from(m);
    }
  });
  }
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
    if constexpr (std::is_same<S, fp8>::value) {  // block-scaled FP8 hessian, stored as sqrt
      parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
        const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
        uint8_t* const q[1] = {tt.ptr<uint8_t>(kRowExpAvgSq, chunk.tensor) + chunk.start};
        float* const scales[1] = {tt.ptr<float>(kRowExpAvgSqScale, chunk.tensor) + chunk.start / kQBlock};
        q8_store_blocks<1>(chunk.len, q, scales, [&](int64_t b0, int64_t n, float (*out)[kQBlock]) {
          const float scale = scales[0][b0 / kQBlock];
          const uint8_t* __restrict__ h_in = q[0] + b0;
          float* __restrict__ h_out = out[0];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const T hh = sophia_hessian(T(q8_decode<true>(h_in[i], scale)), T(to_math(grad[b0 + i])), b2, omb2);
            h_out[i] = sqrtf(float(hh));
          }
        });
      });
    } else {
      parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
        const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, chunk.tensor) + chunk.start;
        S* __restrict__ hessian = tt.ptr<S>(kRowExpAvgSq, chunk.tensor) + chunk.start;
#pragma omp simd
        for (int64_t i = 0; i < chunk.len; ++i)
          hessian[i] = Store<S>::from(sophia_hessian(T(to_math(hessian[i])), T(to_math(grad[i])), b2, omb2));
      });
    }
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
