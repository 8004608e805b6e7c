// SophiaG: the per-element update and the Hessian estimate's moving average,
// shared by the CPU loops (csrc/cpu/sophia.cpp) and the CUDA kernels
// (csrc/cuda/sophia.cu); the reference (fusedopt/reference/sophia.py) and
// Triton (kernels/sophia.py) spell the same operations in the same order:
//
//   g     = grad * grad_mult, negated when maximize
//   p     = p * (1 - lr * weight_decay)
//   m     = m * beta1 + (1 - beta1) * g                       (one FMA, as torch's add_(alpha=))
//   ratio = min(|m| / (h * (rho * bs) + 1e-15), 1)             (NaN stays NaN, as torch.clamp)
//   p     = p + (-lr * sign(m)) * ratio                        (one FMA, as torch's addcmul_)
//   h     = h * beta2 + (1 - beta2) * grad * grad              (update_hessian; one FMA)
#pragma once

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

struct SophiaHyper {
  double lr;
  const float* lr_ptr;  // tensor lr, or null
  double beta1, rho_bs, weight_decay;
  bool maximize;
  const double* grad_mult;  // null: 1 (fp64: rounded once to the math type)
  const float* found_inf;  // GradScaler: skip everything when *found_inf != 0 (null: never)
  StochasticRounding sr;   // bf16 params without master weights rounded stochastically
  bool remainder = false;  // the masters are int16 remainders of bf16 params (numeric.h: join_remainder)
};

template <typename T>
struct SophiaScalars {
  T decay, beta1, one_minus_beta1, rho_bs, neg_lr, grad_mult, sign;
};

template <typename T>
FUSEDOPT_HD SophiaScalars<T> sophia_scalars(const SophiaHyper& h, double lr) {
  SophiaScalars<T> s;
  s.decay = T(1.0 - lr * h.weight_decay);
  s.beta1 = T(h.beta1);
  s.one_minus_beta1 = T(1.0 - h.beta1);
  s.rho_bs = T(h.rho_bs);
  s.neg_lr = T(-lr);
  s.grad_mult = h.grad_mult ? T(*h.grad_mult) : T(1);
  s.sign = h.maximize ? T(-1) : T(1);
  return s;
}

template <typename T, bool GRAD_MULT>
FUSEDOPT_HD void sophia_element(T& p, T grad, T& m, T h, const SophiaScalars<T>& s) {
  const T g = (GRAD_MULT ? grad * s.grad_mult : grad) * s.sign;
  p = p * s.decay;
  m = fused_mul_add(g, s.one_minus_beta1, m * s.beta1);
  T ratio = fabs(m) / (h * s.rho_bs + T(1e-15));
  ratio = ratio > T(1) ? T(1) : ratio;
  const T sign_m = T(m > T(0)) - T(m < T(0));
  p = fused_mul_add(s.neg_lr * sign_m, ratio, p);
}

template <typename T>
FUSEDOPT_HD T sophia_hessian(T h, T grad, T beta2, T one_minus_beta2) {
  return fused_mul_add(one_minus_beta2 * grad, grad, h * beta2);
}

// Launchers; tables in MomentRow layout with the Hessian estimate in the
// kRowExpAvgSq row. sophia_cpu advances the steps; on CUDA the caller does.
// The Hessian update touches only the hessian row (it reads the grads).
void sophia_cpu(const TensorTable& tt, const SophiaHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                int num_threads);
void sophia_hessian_cpu(const TensorTable& tt, double beta2, DType param_dtype, DType state_dtype, bool has_master,
                        int num_threads);
const char* sophia_cuda(const TensorTable& tt, const SophiaHyper& h, DType param_dtype, DType state_dtype,
                        bool has_master, void* stream);
const char* sophia_hessian_cuda(const TensorTable& tt, double beta2, DType param_dtype, DType state_dtype,
                                bool has_master, void* stream);

}  // namespace fusedopt
