// AdamW: the per-element update and the per-tensor scalars, written once and
// shared by the CPU loops (csrc/cpu/adamw.cpp) and the CUDA kernel
// (csrc/cuda/adamw.cu). The reference (fusedopt/reference/adamw.py) and the
// Triton kernel (kernels/adamw.py) spell the same operations in the same order.
//
//   g      = grad * grad_mult, negated when maximize      (grad_mult: 1/GradScaler scale x clip coefficient)
//   p      = p * (1 - lr * weight_decay)                    decoupled decay
//   m      = lerp(m, g, 1 - beta1)                        (one FMA, as torch's lerp)
//   v      = v * beta2 + (1 - beta2) * g * g              (one FMA, as torch's addcmul)
//   vmax   = max(vmax, v)                                   amsgrad only
//   denom  = sqrt(amsgrad ? vmax : v) / sqrt(1 - beta2^step) + eps
//   p      = p - (lr / (1 - beta1^step)) * m / denom
//
// This is torch.optim.AdamW's update (torch/optim/adam.py, single-tensor path),
// including the form of lerp and the grouping of the products.
#pragma once

#include <math.h>

#include "fusedopt/fp8.h"
#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

// Hyperparameters of one launch (one param group, one device, one dtype).
struct AdamWHyper {
  double lr;
  const float* lr_ptr;       // tensor lr (fp32, same memory space as the tensors), or null
  double beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
  const double* grad_mult;   // grads are multiplied by *grad_mult (GradScaler's 1/scale times the clip
                             // coefficient of max_grad_norm); null: by nothing
  const float* found_inf;    // GradScaler: skip everything when *found_inf != 0 (null: never)
  StochasticRounding sr;     // bf16 params without master weights: round the new param stochastically
  Fp8Copy fp8;               // also write FP8 copies of the new weights (fp32 working copies only)
  bool remainder = false;    // the masters are int16 remainders of bf16 params (numeric.h: join_remainder)

  AdamWHyper(double lr_, const float* lr_ptr_, double beta1_, double beta2_, double eps_, double weight_decay_,
             bool amsgrad_, bool maximize_, const double* grad_mult_, const float* found_inf_)
      : lr(lr_), lr_ptr(lr_ptr_), beta1(beta1_), beta2(beta2_), eps(eps_), weight_decay(weight_decay_),
        amsgrad(amsgrad_), maximize(maximize_), grad_mult(grad_mult_), found_inf(found_inf_) {}
};

// What one tensor needs at one step, derived from its own step count. Computed
// in double (once per tensor or chunk, so the cost is nil) and rounded once to
// the math type, as torch's CPU fused kernel does.
template <typename T>
struct AdamWScalars {
  T decay, lerp_w, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_mult, sign;
};

template <typename T>
FUSEDOPT_HD AdamWScalars<T> adamw_scalars(const AdamWHyper& h, double lr, double step) {
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  AdamWScalars<T> s;
  s.decay = T(1.0 - lr * h.weight_decay);
  s.lerp_w = T(1.0 - h.beta1);
  s.beta2 = T(h.beta2);
  s.one_minus_beta2 = T(1.0 - h.beta2);
  s.eps = T(h.eps);
  s.step_size = T(lr / bc1);
  s.bc2_sqrt = T(sqrt(bc2));
  s.grad_mult = h.grad_mult ? T(*h.grad_mult) : T(1);
  s.sign = h.maximize ? T(-1) : T(1);
  return s;
}

// One element. p, m, v, vmax are in math precision and updated in place.
template <typename T, bool AMSGRAD, bool GRAD_MULT>
FUSEDOPT_HD void adamw_element(T& p, T grad, T& m, T& v, T& vmax, const AdamWScalars<T>& s) {
  // Multiply only when there is a multiplier (a template flag: compilers do
  // not reliably unswitch the test out of the loop).
  const T g = (GRAD_MULT ? grad * s.grad_mult : grad) * s.sign;
  p = p * s.decay;
  m = lerp(m, g, s.lerp_w);
  v = fused_mul_add(s.one_minus_beta2 * g, g, v * s.beta2);
  T vhat = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    vhat = vmax;
  }
  const T denom = sqrt(vhat) / s.bc2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

// Launchers (raw pointers, no torch). The CPU launcher also advances each
// tensor's step (row kRowStep) before using it; on CUDA the caller does
// (a kernel cannot: every block of a tensor reads the step). `param_dtype` is
// the dtype of params and grads, `state_dtype` that of the moments (see
// dispatch.h for the combinations); with `has_master` (bf16/fp16 params only)
// the fp32 master weights (row kRowMaster) are what the update reads and
// writes, and the param gets the new master rounded once.
void adamw_cpu(const TensorTable& tt, const AdamWHyper& h, DType param_dtype, DType state_dtype, bool has_master,
               int num_threads);

// Launches on `stream` (a cudaStream_t). Returns nullptr on success, else the
// CUDA error string.
const char* adamw_cuda(const TensorTable& tt, const AdamWHyper& h, DType param_dtype, DType state_dtype,
                       bool has_master, void* stream);

}  // namespace fusedopt
