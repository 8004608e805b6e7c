// Norms of many tensors and in-place scaling: the shared reduction behind
// clip_grad_norm_, max_grad_norm in every optimizer and LAMB's trust ratio.
//
// A p-norm is reduced in two levels, deterministically for a given layout:
// each chunk of each tensor gets a partial (sum of |x|^p, or max |x| for
// p = inf), then each tensor's partials are combined in chunk order. No float
// atomics. NaN anywhere makes the norm NaN (as torch.linalg.vector_norm).
#pragma once

#include <math.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

// Which reduction a norm order needs; the general case pays for a pow().
enum class NormKind : int32_t { kL1 = 0, kL2 = 1, kInf = 2, kGeneral = 3 };

inline NormKind norm_kind(double p) {
  if (p == 1.0) return NormKind::kL1;
  if (p == 2.0) return NormKind::kL2;
  if (isinf(p)) return NormKind::kInf;
  return NormKind::kGeneral;
}

// The term one element contributes: |x|, x*x, |x| (combined by max) or |x|^p.
template <NormKind K, typename T>
FUSEDOPT_HD T norm_term(T x, T p) {
  if (K == NormKind::kL2) return x * x;
  if (K == NormKind::kGeneral) return pow(fabs(x), p);
  return fabs(x);
}

// max_grad_norm's scalars for a step, bit for bit as fusedopt/norms.py's
// l2_from_power and clip_coefficient and optim/plans.py's grad_multiplier form
// them with torch ops, from `root`, the square root of the grads' sum of
// squares (taken by torch: its double sqrt is not always correctly rounded):
// the norm root (/ GradScaler's scale) in double, rounded to T (float, double
// when some grads are); the clip coefficient min(max_norm / (norm + 1e-6), 1)
// in T, in torch's order (1e-6 rounded to T, Tensor.__rtruediv__'s reciprocal,
// then times max_norm rounded to T; NaN stays NaN as in torch.clamp); the
// grads' multiplier double(clip) (* 1/scale).
template <typename T>
struct ClipScalars {
  T norm;
  double grad_mult;
};

template <typename T>
FUSEDOPT_HD ClipScalars<T> clip_scalars(double root, double max_norm, const double* grad_scale) {
  const T norm = T(grad_scale ? root / *grad_scale : root);
  const T clip = (T(1) / (norm + T(1e-6))) * T(max_norm);
  double mult = double(clip > T(1) ? T(1) : clip);
  if (grad_scale) mult = mult * (1.0 / *grad_scale);
  return {norm, mult};
}

// Launchers. `out` receives one value per tensor: the sum of the terms (max
// for kInf), in double; NaN when the tensor holds a NaN. Each term is formed in
// the math type (so it overflows and underflows as torch's does), every sum in
// double, on every backend.
void power_sums_cpu(const TensorTable& tt, DType dtype, double p, double* out, int num_threads);
// x *= *factor for every element: the factor (fp64: a clip coefficient of fp64
// grads keeps its bits) rounded to the math type, fp32 (fp64 for fp64 tensors),
// the product rounded once to the tensor's dtype.
void scale_cpu(const TensorTable& tt, DType dtype, const double* factor, int num_threads);

// CUDA: `partials` is device scratch of n_chunks doubles, `out` device memory
// of n_tensors doubles, `chunk_first` the first chunk of each tensor
// ([n_tensors + 1], device). Return nullptr or the CUDA error string.
const char* power_sums_cuda(const TensorTable& tt, const int64_t* chunk_first, DType dtype, double p,
                            double* partials, double* out, void* stream);
const char* scale_cuda(const TensorTable& tt, DType dtype, const double* factor, void* stream);

}  // namespace fusedopt
