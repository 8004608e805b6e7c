// LAMB: the per-element pieces, shared by the CPU loops (csrc/cpu/lamb.cpp)
// and the CUDA kernels (csrc/cuda/lamb.cu); the reference
// (fusedopt/reference/lamb.py) and Triton (kernels/lamb.py) spell the same
// operations in the same order:
//
//   g      = grad * grad_mult, negated when maximize    (grad_mult: 1/c of the global-norm clip, x 1/scale)
//   g      = g + weight_decay * p                        (unless adam_w_mode)
//   m      = m * beta1 + g * beta3                       (beta3 = 1 - beta1 if grad_averaging else 1)
//   v      = v * beta2 + g * (1 - beta2) * g
//   u      = (m / bc1) / (sqrt(v / bc2) + eps)          (bc = 1 - beta^step if bias_correction else 1)
//   u      = u + weight_decay * p                        (adam_w_mode)
//   p      = p - u * ratio                               (ratio from ||p||, ||u||: reference/lamb.py)
//
// Two passes: "moments" updates m and v and reduces sum(p^2), sum(u^2) per
// tensor; "apply" recomputes u from the new m and v (8 bytes per param, what
// storing u and reading it back would cost, without a buffer) and updates p.
#pragma once

#include <math.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

struct LambHyper {
  double beta1, beta2, eps, weight_decay;
  bool bias_correction, adam_w_mode, grad_averaging, maximize;
  const double* grad_mult;  // null: 1 (fp64: rounded once to the math type)
  const float* found_inf;  // GradScaler: skip everything when *found_inf != 0 (null: never)
  StochasticRounding sr;   // the apply pass: bf16 params without master weights rounded stochastically
  bool remainder = false;  // the masters are int16 remainders of bf16 params (numeric.h: join_remainder)
};

template <typename T>
struct LambScalars {
  T beta1, beta3, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay, grad_mult, sign;
};

template <typename T>
FUSEDOPT_HD LambScalars<T> lamb_scalars(const LambHyper& h, double step) {
  LambScalars<T> s;
  s.beta1 = T(h.beta1);
  s.beta3 = T(h.grad_averaging ? 1.0 - h.beta1 : 1.0);
  s.beta2 = T(h.beta2);
  s.one_minus_beta2 = T(1.0 - h.beta2);
  s.bc1 = T(h.bias_correction ? 1.0 - pow(h.beta1, step) : 1.0);
  s.bc2 = T(h.bias_correction ? 1.0 - pow(h.beta2, step) : 1.0);
  s.eps = T(h.eps);
  s.weight_decay = T(h.weight_decay);
  s.grad_mult = h.grad_mult ? T(*h.grad_mult) : T(1);
  s.sign = h.maximize ? T(-1) : T(1);
  return s;
}

// The moments of one element; m and v updated in place.
template <typename T, bool GRAD_MULT, bool ADAM_W>
FUSEDOPT_HD void lamb_moments(T p, T grad, T& m, T& v, const LambScalars<T>& s) {
  T g = (GRAD_MULT ? grad * s.grad_mult : grad) * s.sign;
  if (!ADAM_W) g = g + s.weight_decay * p;
  m = m * s.beta1 + g * s.beta3;
  v = v * s.beta2 + g * s.one_minus_beta2 * g;
}

// u of one element, from the updated moments.
template <typename T, bool ADAM_W>
FUSEDOPT_HD T lamb_direction(T p, T m, T v, const LambScalars<T>& s) {
  T u = (m / s.bc1) / (sqrt(v / s.bc2) + s.eps);
  if (ADAM_W) u = u + s.weight_decay * p;
  return u;
}

// Launchers (raw pointers, no torch); tables in MomentRow layout without the
// max_exp_avg_sq row. `param_dtype`, `state_dtype` and `has_master` as for AdamW.
// lamb_moments_* advance the steps on the CPU (on CUDA the
// caller does) and write per-tensor sum(p^2) and sum(u^2) in double.
void lamb_moments_cpu(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                      double* p_sums, double* u_sums, int num_threads);
void lamb_apply_cpu(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                    const float* ratio, int num_threads);

// CUDA: `partials` is device scratch of 2 * n_chunks doubles; p_sums, u_sums,
// ratio are device arrays of n_tensors; chunk_first as for power_sums_cuda.
const char* lamb_moments_cuda(const TensorTable& tt, const int64_t* chunk_first, const LambHyper& h,
                              DType param_dtype, DType state_dtype, bool has_master, double* partials, double* p_sums,
                              double* u_sums, void* stream);
const char* lamb_apply_cuda(const TensorTable& tt, const LambHyper& h, DType param_dtype, DType state_dtype,
                            bool has_master, const float* ratio, void* stream);

}  // namespace fusedopt
