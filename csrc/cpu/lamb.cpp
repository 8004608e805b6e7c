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

// S: the moments' storage (fp8: block-scaled, StateBlock: walked in blocks,
// each block's u formed once it is encoded). u is formed from the moments as
// stored: the apply pass recomputes exactly this.
template <typename P, typename S, bool MASTER, bool REM, bool GRAD_MULT, bool ADAM_W>
void moments(const TensorTable& tt, const LambHyper& h, double* p_sums, double* u_sums, int num_threads) {
  using T = typename MathOf<P>::type;
  const std::vector<LambScalars<T>> scalars = advance_and_scalars<T>(tt, h);
  std::vector<double> p_part(size_t(tt.n_chunks)), u_part(size_t(tt.n_chunks));
  constexpr bool kFp8 = StateBlock<S, false>::kFp8;
  constexpr int64_t kBlock = kFp8 ? kQBlock : 0;  // 0: the chunk in one loop
  parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start, len = chunk.len;
    const LambScalars<T> s = scalars[size_t(t)];
    const Weights<P, MASTER, REM, false> w(tt, kRowParam, kRowMaster, t, begin, 0u);
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + begin;
    StateBlock<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, begin);
    StateBlock<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, begin);
    double p_acc = 0.0, u_acc = 0.0;
    for (int64_t b0 = 0; b0 < len; b0 += kBlock ? kBlock : len) {
      const int64_t b1 = kBlock && b0 + kBlock < len ? b0 + kBlock : len;
      const auto mb = m.block(b0), vb = v.block(b0);
#pragma omp simd reduction(+ : p_acc, u_acc)
      for (int64_t i = 0; i < b1 - b0; ++i) {
        const T p = w.template load<T>(b0 + i);
        T mi = mb.template get<T>(i), vi = vb.template get<T>(i);
        lamb_moments<T, GRAD_MULT, ADAM_W>(p, T(to_math(grad[b0 + i])), mi, vi, s);
        mb.set(i, mi);
        vb.set(i, vi);
        p_acc += double(p) * double(p);
        if constexpr (!kFp8) {  // a plain state reads back as just written
          const T u = lamb_direction<T, ADAM_W>(p, mb.template get<T>(i), vb.template get<T>(i), s);
          u_acc += double(u) * double(u);
        }
      }
      m.end_block(b0, b1 - b0);
      v.end_block(b0, b1 - b0);
      if constexpr (kFp8) {
        const auto mn = m.block(b0), vn = v.block(b0);  // with the new scales
#pragma omp simd reduction(+ : u_acc)
        for (int64_t i = 0; i < b1 - b0; ++i) {
          const T u = lamb_direction<T, ADAM_W>(w.template load<T>(b0 + i), mn.template get<T>(i),
                                                vn.template get<T>(i), s);
          u_acc += double(u) * double(u);
        }
      }
    }
    p_part[size_t(c)] = p_acc;
    u_part[size_t(c)] = u_acc;
  });
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
    StateBlock<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, begin);  // read only
    StateBlock<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, begin);
    constexpr int64_t kBlock = StateBlock<S, false>::kFp8 ? kQBlock : 0;  // 0: the chunk in one loop
    for (int64_t b0 = 0; b0 < len; b0 += kBlock ? kBlock : len) {
      const int64_t b1 = kBlock && b0 + kBlock < len ? b0 + kBlock : len;
      const auto mb = m.block(b0), vb = v.block(b0);
#pragma omp simd
      for (int64_t i = 0; i < b1 - b0; ++i) {
        T p = w.template load<T>(b0 + i);
        const T u = lamb_direction<T, ADAM_W>(p, mb.template get<T>(i), vb.template get<T>(i), s);
        p = p - u * r;
        w.store(b0 + i, p);
      }
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
