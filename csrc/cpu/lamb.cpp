// LAMB on the CPU (include/fusedopt/lamb.h): the moments pass and the apply
// pass, each one OpenMP region over the chunks of every tensor. Per-chunk sums
// of p^2 and u^2 are combined per tensor in chunk order (deterministic).
#include <vector>

#include "fp8_blocks.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/lamb.h"
#include "parallel.h"
#include "weights.h"

namespace fusedopt {
namespace {

template <typename T>
std::vector<LambScalars<T>> advance_and_scalars(const TensorTable& tt, const LambHyper& h) {
  std::vector<LambScalars<T>> scalars(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) {
    float& step = *tt.ptr<float>(kRowStep, t);
    step += 1.0f;  // this step's count (the optimizer's state["step"])
    scalars[size_t(t)] = lamb_scalars<T>(h, double(step));
  }
  return scalars;
}

template <typename T>
std::vector<LambScalars<T>> scalars_of(const TensorTable& tt, const LambHyper& h) {
  std::vector<LambScalars<T>> scalars(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) scalars[size_t(t)] = lamb_scalars<T>(h, double(*tt.ptr<float>(kRowStep,
       t)));
  return scalars;
}

// Block-scaled FP8 states (fp8_blocks.h): m and sqrt(v) encoded per block,
// then u formed from the block as stored, as the apply pass will read it.
template <typename P, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
void moments_fp8_states(const TensorTable& tt, const std::vector<LambScalars<typename MathOf<P>::type>>& scalars,
                        std::vector<double>& p_part, std::vector<double>& u_part, int num_threads) {
  using T = typename MathOf<P>::type;
  parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start;
    const LambScalars<T> s = scalars[size_t(t)];
    const Weights<P, MASTER, REM, false> w(tt, kRowParam, kRowMaster, t, begin, 0u);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + begin;
    uint8_t* const q[2] = {tt.ptr<uint8_t>(kRowExpAvg, t) + begin, tt.ptr<uint8_t>(kRowExpAvgSq, t) + begin};
    float* const scales[2] = {tt.ptr<float>(kRowExpAvgScale, t) + begin / kQBlock,
                              tt.ptr<float>(kRowExpAvgSqScale, t) + begin / kQBlock};
    double p_acc = 0.0, u_acc = 0.0;
    q8_store_blocks<2>(
        chunk.len, q, scales,
        [&](int64_t b0, int64_t n, float (*out)[kQBlock]) {
          const float m_scale = scales[0][b0 / kQBlock], v_scale = scales[1][b0 / kQBlock];
          const uint8_t* __restrict__ m_in = q[0] + b0;
          const uint8_t* __restrict__ v_in = q[1] + b0;
          float* __restrict__ m_out = out[0];
          float* __restrict__ s_out = out[1];
#pragma omp simd reduction(+ : p_acc)
          for (int64_t i = 0; i < n; ++i) {
            const int64_t e = b0 + i;
            const T p = w.template load<T>(e);
            T m = T(q8_decode<false>(m_in[i], m_scale));
            T v = T(q8_decode<true>(v_in[i], v_scale));
            lamb_moments<T, GRAD_MULT, ADAM_W>(p, T(to_math(grad[e])), m, v, s);
            m_out[i] = float(m);
            s_out[i] = sqrtf(float(v));
            p_acc += double(p) * double(p);
          }
        },
        [&](int64_t b0, int64_t n) {
          const float m_scale = scales[0][b0 / kQBlock], v_scale = scales[1][b0 / kQBlock];
          const uint8_t* __restrict__ m_in = q[0] + b0;
          const uint8_t* __restrict__ v_in = q[1] + b0;
#pragma omp simd reduction(+ : u_acc)
          for (int64_t i = 0; i < n; ++i) {
            const int64_t e = b0 + i;
            const T p = w.template load<T>(e);
            const T u = lamb_direction<T, ADAM_W>(p, T(q8_decode<false>(m_in[i], m_scale)),
                                                  T(q8_decode<true>(v_in[i], v_scale)), s);
            u_acc += double(u) * double(u);
          }
        });
    p_part[size_t(c)] = p_acc;
    u_part[size_t(c)] = u_acc;
  });
}

template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
void moments(const TensorTable& tt, const LambHyper& h, double* p_sums, double* u_sums, int num_threads) {
  using T = typename MathOf<P>::type;
  const std::vector<LambScalars<T>> scalars = advance_and_scalars<T>(tt, h);
  std::vector<double> p_part(size_t(tt.n_chunks)), u_part(size_t(tt.n_chunks));
  if constexpr (std::is_same<S, fp8>::value) {
    moments_fp8_states<P, MASTER, REM, GRAD_MULT, ADAM_W>(tt, scalars, p_part, u_part, num_threads);
  } else {
  parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start, len = chunk.len;
    const LambScalars<T> s = scalars[size_t(t)];
    const Weights<P, MASTER, REM, false> w(tt, kRowParam, kRowMaster, t, begin, 0u);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + begin;
    S* __restrict__ exp_avg = tt.ptr<S>(kRowExpAvg, t) + begin;
    S* __restrict__ exp_avg_sq = tt.ptr<S>(kRowExpAvgSq, t) + begin;
    double p_acc = 0.0, u_acc = 0.0;
#pragma omp simd reduction(+ : p_acc, u_acc)
    for (int64_t i = 0; i < len; ++i) {
      const T p = w.template load<T>(i);
      T m = to_math(exp_avg[i]);
      T v = to_math(exp_avg_sq[i]);
      lamb_moments<T, GRAD_MULT, ADAM_W>(p, T(to_math(grad[i])), m, v, s);
      const S m_stored = Store<S>::from(m), v_stored = Store<S>::from(v);
      exp_avg[i] = m_stored;
      exp_avg_sq[i] = v_stored;
      // u from the moments as stored: the apply pass recomputes exactly this
      const T u = lamb_direction<T, ADAM_W>(p, T(to_math(m_stored)), T(to_math(v_stored)), s);
      p_acc += double(p) * double(p);
      u_acc += double(u) * double(u);
    }
    p_part[size_t(c)] = p_acc;
    u_part[size_t(c)] = u_acc;
  });
  }
  for (int64_t t = 0; t < tt.n_tensors; ++t) p_sums[t] = u_sums[t] = 0.0;
  for (int64_t c = 0; c < tt.n_chunks; ++c) {  // a tensor's chunks are consecutive: chunk order
    p_sums[tt.chunk_tensor[c]] += p_part[size_t(c)];
    u_sums[tt.chunk_tensor[c]] += u_part[size_t(c)];
  }
}

template <typename P, typename S, bool MASTER, bool REM, bool ADAM_W, bool SR>
void apply(const TensorTable& tt, const LambHyper& h, const float* ratio, int num_threads) {
  using T = typename MathOf<P>::type;
  const std::vector<LambScalars<T>> scalars = scalars_of<T>(tt, h);
  parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start, len = chunk.len;
    const LambScalars<T> s = scalars[size_t(t)];
    const T r = T(ratio[t]);
    const Weights<P, MASTER, REM, SR> w(tt, kRowParam, kRowMaster, t, begin, h.sr.seed);
    const S* __restrict__ exp_avg = tt.ptr<const S>(kRowExpAvg, t) + begin;
    const S* __restrict__ exp_avg_sq = tt.ptr<const S>(kRowExpAvgSq, t) + begin;
    // FP8 states: each element's block scales (rows absent otherwise)
    const float* __restrict__ m_scales = nullptr;
    const float* __restrict__ v_scales = nullptr;
    if constexpr (std::is_same<S, fp8>::value) {
      m_scales = tt.ptr<const float>(kRowExpAvgScale, t) + begin / kQBlock;
      v_scales = tt.ptr<const float>(kRowExpAvgSqScale, t) + begin / kQBlock;
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      T p = w.template load<T>(i);
      T m, v;
      if constexpr (std::is_same<S, fp8>::value) {
        const uint8_t* m_bytes = reinterpret_cast<const uint8_t*>(exp_avg);
        const uint8_t* v_bytes = reinterpret_cast<const uint8_t*>(exp_avg_sq);
        m = T(q8_decode<false>(m_bytes[i], m_scales[i / kQBlock]));
        v = T(q8_decode<true>(v_bytes[i], v_scales[i / kQBlock]));
      } else {
        m = T(to_math(exp_avg[i]));
        v = T(to_math(exp_avg_sq[i]));
      }
      const T u = lamb_direction<T, ADAM_W>(p, m, v, s);
      p = p - u * r;
      w.store(i, p);
    }
  });
}

template <typename P, typename S, bool MASTER>
struct MomentsOp {
  template <bool REM>
  static void run_rem(const TensorTable& tt, const LambHyper& h, double* p_sums, double* u_sums, int n) {
    const bool mult = h.grad_mult != nullptr;
    if (mult && h.adam_w_mode) moments<P, S, MASTER, REM, true, true>(tt, h, p_sums, u_sums, n);
    else if (mult) moments<P, S, MASTER, REM, true, false>(tt, h, p_sums, u_sums, n);
    else if (h.adam_w_mode) moments<P, S, MASTER, REM, false, true>(tt, h, p_sums, u_sums, n);
    else moments<P, S, MASTER, REM, false, false>(tt, h, p_sums, u_sums, n);
  }
  static void run(const TensorTable& tt, const LambHyper& h, double* p_sums, double* u_sums, int n) {
    with_remainder<P, MASTER>(h.remainder,
                              [&](auto rem) { run_rem<decltype(rem)::value>(tt, h, p_sums, u_sums, n); });
  }
};

template <typename P, typename S, bool MASTER>
struct ApplyOp {
  template <bool REM, bool SR>
  static void run_sr(const TensorTable& tt, const LambHyper& h, const float* ratio, int n) {
    if (h.adam_w_mode) apply<P, S, MASTER, REM, true, SR>(tt, h, ratio, n);
    else apply<P, S, MASTER, REM, false, SR>(tt, h, ratio, n);
  }
  static void run(const TensorTable& tt, const LambHyper& h, const float* ratio, int n) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (h.sr.on) return run_sr<false, true>(tt, h, ratio, n);
    }
    with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_sr<decltype(rem)::value, false>(tt, h, ratio, n); });
  }
};

}  // namespace

void lamb_moments_cpu(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                      double* p_sums, double* u_sums, int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) {  // GradScaler found inf/NaN: skip the step, steps too
    for (int64_t t = 0; t < tt.n_tensors; ++t) p_sums[t] = u_sums[t] = 0.0;
    return;
  }
  dispatch_storage<MomentsOp, true>(param_dtype, state_dtype, has_master, tt, h, p_sums, u_sums, num_threads);
}

void lamb_apply_cpu(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                    const float* ratio, int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;
  dispatch_storage<ApplyOp, true>(param_dtype, state_dtype, has_master, tt, h, ratio, num_threads);
}

}  // namespace fusedopt
