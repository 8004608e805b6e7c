// Adafactor's per-step and per-element pieces of the CPU launches, shared by
// the fused launch (adafactor.cpp) and the phases of DTensor params
// (adafactor_sharded.cpp).
#pragma once

#include <vector>

#include "fusedopt/adafactor.h"
#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"
#include "weights.h"

namespace fusedopt {
namespace adafactor_cpu {

// The scalars of each tensor's step that need no statistics, from its step count as it is.
inline std::vector<AdafactorStep> step_scalars(const TensorTable& tt, const AdafactorHyper& h) {
  const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
  std::vector<AdafactorStep> steps(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) steps[size_t(t)] = adafactor_step(h, lr, double(*tt.ptr<float>(kAfStep, t)));
  return steps;
}

// Steps advanced, and the scalars that need no statistics.
inline std::vector<AdafactorStep> advance_steps(const TensorTable& tt, const AdafactorHyper& h) {
  for (int64_t t = 0; t < tt.n_tensors; ++t) *tt.ptr<float>(kAfStep, t) += 1.0f;
  return step_scalars(tt, h);
}

// Per-tensor scale = -alpha / denom.
inline double tensor_scale(const AdafactorHyper& h, const AdafactorStep& step, double p_sq, double u_sq,
                           int64_t numel) {
  double alpha, denom;
  adafactor_scale(h, step, p_sq, u_sq, double(numel), &alpha, &denom);
  return -alpha / denom;
}

// sum(u*u) over the C elements of one factored row (u: adafactor.h's factored_u of the row's rowq and
// rrow and the columns' col and rcol), in the math type, in SIMD lanes.
template <typename T, typename P>
inline T row_u_squares(const P* __restrict__ grad, int64_t C, T mult, T rq, T rr, const T* __restrict__ cv,
                       const T* __restrict__ rc, T eps1_sq, T inv_eps1) {
  T row_u = T(0);
#pragma omp simd reduction(+ : row_u)
  for (int64_t c = 0; c < C; ++c) {
    const T u = factored_u(T(to_math(grad[c])) * mult, rq, rr, cv[c], rc[c], eps1_sq, inv_eps1);
    row_u += u * u;
  }
  return row_u;
}

// Final per-element write of element i of w (weights.h): p = p * decay + scale * x.
template <typename T, typename W>
inline void write_param(const W& w, int64_t i, T x, T decay, T scale) {
  w.store(i, adafactor_apply(w.template load<T>(i), x, decay, scale));
}

// The update of one element from its u: p = p * decay + scale * u, or with
// BETA1 the step itself averaged, m = lerp(m, u * -scale, 1 - beta1), and
// p = p * decay - m (m as stored).
template <typename T, typename S, bool BETA1, typename W>
inline void apply_element(const W& w, S* exp_avg, int64_t i, T u, T decay, T scale, T m_weight) {
  if (BETA1) {
    const S m = Store<S>::from(lerp(T(to_math(exp_avg[i])), u * -scale, m_weight));
    exp_avg[i] = m;
    write_param(w, i, T(to_math(m)), decay, T(-1));
  } else {
    write_param(w, i, u, decay, scale);
  }
}

}  // namespace adafactor_cpu
}  // namespace fusedopt
