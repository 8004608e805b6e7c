// Adafactor: the per-element pieces shared by the CPU loops (csrc/cpu/
// adafactor.cpp) and, in the same order, the reference
// (fusedopt/reference/adafactor.py, which is torch.optim.Adafactor's code) and
// the Triton kernels (kernels/adafactor.py):
//
//   g        = grad * grad_mult, negated when maximize
//   variance = lerp(variance, g * g, 1 - beta2_t)                     (0-d / 1-d tensors)
//   row_var  = lerp(row_var, sum_c g^2 / C, 1 - beta2_t)             (2+ dims: [.., R, 1])
//   col_var  = lerp(col_var, sum_r g^2 / R, 1 - beta2_t)             ([.., 1, C])
//   var_est  = variance                                             (0-d / 1-d)
//   u        = rsqrt(clamp(var_est, min=eps1^2)) * g
//   factored: rmean = clamp(mean_r row_var, min=eps1), rowq = row_var / rmean,
//   u        = g * (rowq * col_var < eps1^2 ? 1/eps1 : rsqrt(rowq) * rsqrt(col_var))
//              (torch's rsqrt(clamp(row_var * col_var / rmean, eps1^2)) * g, up to a few
//              ulps, with the square roots and divisions per row and per column, not per element)
//   p        = p * (1 - lr * weight_decay) + (-alpha / denom) * u        alpha = max(eps2, RMS(p)) * rho,
//   (beta1:  m = lerp(m, u * (alpha / denom), 1 - beta1);  p = p * decay - m)   denom = max(1, RMS(u) / d)
//            with m as stored: rounded to its storage, or block-scaled FP8 (fp8_states.h)
//
// clamp keeps NaN (as torch.clamp): written as `x < lo ? lo : x`.
#pragma once

#include <math.h>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

// Rows of the Adafactor tensor table (fusedopt/backends/_adafactor_tables.py: ADAFACTOR_ROWS).
enum AdafactorRow : int {
  kAfParam = 0, kAfGrad = 1, kAfExpAvg = 2, kAfVariance = 3, kAfRowVar = 4, kAfColVar = 5, kAfMaster = 6,
  kAfStep = 7, kAfExpAvgScale = 8, kAdafactorRows = 9
};

struct AdafactorHyper {
  double lr;
  const float* lr_ptr;  // tensor lr, or null
  double beta2_decay, eps1, eps2, d, weight_decay;
  bool maximize;
  bool has_beta1;
  double beta1;
  const double* grad_mult;  // null: 1 (fp64: rounded once to the math type)
  const float* found_inf;  // GradScaler: skip everything when *found_inf != 0 (null: never)
  StochasticRounding sr;   // bf16 params without master weights rounded stochastically
  bool remainder = false;  // the masters are int16 remainders of bf16 params (numeric.h: join_remainder)
};

template <typename T>
FUSEDOPT_HD T clamp_min(T x, T lo) { return x < lo ? lo : x; }  // NaN stays NaN

// u of one element from its variance estimate.
template <typename T>
FUSEDOPT_HD T adafactor_u(T g, T var_est, T eps1_sq) { return (T(1) / sqrt(clamp_min(var_est, eps1_sq))) * g; }

// u of a factored element: g * (rowq * col < eps1^2 ? 1 / eps1 : rsqrt(rowq) * rsqrt(col)), from the row's
// rowq = row_var / rmean and rrow = 1 / sqrt(rowq) and the column's col and rcol = 1 / sqrt(col). `g` already
// carries grad_mult and the sign.
template <typename T>
FUSEDOPT_HD T factored_u(T g, T rowq, T rrow, T col, T rcol, T eps1_sq, T inv_eps1) {
  const T factor = rrow * rcol;  // formed either way: a branch-free select vectorises
  return g * (rowq * col < eps1_sq ? inv_eps1 : factor);
}

// factored_u of an element known not to be clamped (rowq * col >= eps1^2, or NaN): the same bits.
template <typename T>
FUSEDOPT_HD T factored_u_unclamped(T g, T rrow, T rcol) { return g * (rrow * rcol); }

// The grad as the update sees it.
template <typename T, bool GRAD_MULT>
FUSEDOPT_HD T adafactor_grad(T grad, T grad_mult, T sign) { return (GRAD_MULT ? grad * grad_mult : grad) * sign; }

// Per-tensor scalars of a step, in double: before the statistics (beta2_t,
// rho, decay) and after them (alpha, denom).
struct AdafactorStep {
  double one_minus_beta2_t, rho, decay;
};

FUSEDOPT_HD AdafactorStep adafactor_step(const AdafactorHyper& h, double lr, double step) {
  AdafactorStep s;
  s.one_minus_beta2_t = pow(step, h.beta2_decay);
  const double inv_sqrt_step = 1.0 / sqrt(step);
  s.rho = lr < inv_sqrt_step ? lr : inv_sqrt_step;
  s.decay = 1.0 - lr * h.weight_decay;
  return s;
}

// alpha and denom from sum(p^2) and sum(u^2) over the tensor's numel elements.
FUSEDOPT_HD void adafactor_scale(const AdafactorHyper& h, const AdafactorStep& s, double p_sq, double u_sq,
                                 double numel, double* alpha, double* denom) {
  const double rms_p = sqrt(p_sq) / sqrt(numel);
  *alpha = (h.eps2 > rms_p ? h.eps2 : rms_p) * s.rho;
  const double rms_u = sqrt(u_sq) / (sqrt(numel) * h.d);
  *denom = rms_u > 1.0 ? rms_u : 1.0;
}

// p = p * decay + scale * x (x: u, or the first moment as stored): the final
// step of every element, in one order on every backend.
template <typename T>
FUSEDOPT_HD T adafactor_apply(T p, T x, T decay, T scale) { return fused_mul_add(scale, x, p * decay); }

// Launchers (raw pointers, no torch). Tables in AdafactorRow layout; the CPU
// launchers advance the steps. `factored`: tensors of 2+ dims, contiguous,
// rows[t] x cols[t] the last two dims (leading dims batched); otherwise 0-d
// and 1-d tensors with an elementwise `variance`. `state_dtype`: the storage
// of the second-moment statistics and of exp_avg, unless `fp8_exp_avg`: then
// exp_avg is block-scaled FP8 (scales in row kAfExpAvgScale; chunks are
// multiples of kQBlock).
void adafactor_factored_cpu(const TensorTable& tt, const int64_t* rows, const int64_t* cols,
                            const AdafactorHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                            bool fp8_exp_avg, int num_threads);
void adafactor_vector_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype, DType state_dtype,
                          bool has_master, bool fp8_exp_avg, int num_threads);

// The vector launch in its two passes, for DTensor params whose sums are
// taken over every shard between them (fusedopt/dtensor.py): stats advances
// the steps, updates `variance` and writes each tensor's sum(p^2) and
// sum(u^2); update scales by the given sums over `numel` elements each.
// With found_inf set, stats writes zeros and neither changes anything.
void adafactor_vector_stats_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype,
                                DType state_dtype, bool has_master, int num_threads, double* p_sq, double* u_sq);
void adafactor_vector_update_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype,
                                 DType state_dtype, bool has_master, bool fp8_exp_avg, int num_threads,
                                 const double* p_sq, const double* u_sq, const int64_t* numel);

// The factored step of DTensor params in phases (csrc/cpu/adafactor_sharded.cpp), for the collectives
// between them: sums (advances the steps; per local row and column the sums of g^2, per tensor sum(p^2)),
// factors (row_var, col_var from the whole rows' and columns' sums; per slice the sum of row_var over its
// local rows), unorm (per tensor sum(u^2)), update. `dims` [n * 5]: B, local R and C, whole R and C per
// tensor; local shards may be empty. With found_inf set, each writes zeros and changes nothing.
void adafactor_sharded_sums_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                double* row_sums, double* col_sums, double* p_sq);
void adafactor_sharded_factors_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                   DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                   const double* row_sums, const double* col_sums, double* rv_sums);
void adafactor_sharded_unorm_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                 DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                 const double* rv_sums, double* u_sq);
void adafactor_sharded_update_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                  DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                  const double* rv_sums, const double* p_sq, const double* u_sq,
                                  const int64_t* numel);

// The CUDA kernels' work lists for factored tensors, built once per layout on
// the Python side (fusedopt/backends/_adafactor_tables.py: factored_tasks) as one int64
// device array whose parts follow in this order (FACTORED_TASK_PARTS there).
// A task is at most kAfTaskRows rows of one batch slice; a column program is
// kAfColBlock columns of one slice.
constexpr int kAfTaskRows = 32;
constexpr int kAfColBlock = 64;
struct AdafactorLayout {
  const int64_t* rows;              // [n] R and C, the last two dims of each tensor
  const int64_t* cols;              // [n]
  const int64_t* slice_first;       // [n] the tensor's first batch slice
  const int64_t* task_first;        // [n + 1] the tensor's tasks
  const int64_t* task_slice;        // [n_tasks] the task's slice,
  const int64_t* task_row0;         //   its first row in the slice,
  const int64_t* task_rows;         //   its row count (<= kAfTaskRows),
  const int64_t* task_col;          //   and where its column partials start
  const int64_t* slice_tensor;      // [n_slices] the slice's tensor
  const int64_t* slice_batch;       // [n_slices] and batch index
  const int64_t* slice_task_first;  // [n_slices + 1] the slice's tasks (consecutive)
  const int64_t* colprog_slice;     // [n_col_programs] the column program's slice
  const int64_t* colprog_col0;      // [n_col_programs] and first column
  int64_t n_tasks, n_slices, n_col_programs, col_total;  // col_total: sum over tasks of C
};

// Scratch of one CUDA launch (fp64 device arrays, written before read).
struct AdafactorScratch {
  double* col_partial;  // [col_total] factored: each task's column sums of g^2
  double* p_partial;    // [n_tasks] factored, [n_chunks] vector: partial sums of p^2
  double* u_partial;    // [n_chunks] partial sums of u^2
  double* rmean;        // [n_slices] factored: clamp(mean of row_var, eps1) per slice
  double* sums;         // [3 n] sum(p^2), sum(u^2) and the scale (-alpha / denom) per tensor
};

// The phases of DTensor params' local shards on CUDA (adafactor_sharded_cuda), for the collectives
// between them: 0 (factored) the row and column sums of g^2 into row_sums / col_sums and sum(p^2) per
// tensor into scratch.sums; (0-d / 1-d) variance updated, sum(p^2) and sum(u^2) into scratch.sums;
// 1 row_var and col_var from the whole rows' and columns' sums, per slice the sum of row_var into
// rv_sums; 2 sum(u^2) into scratch.sums + n with scratch.rmean given; 3 the update with the scales given
// in scratch.sums + 2n. A slice's sums sit at row_base[t] + b * R (rows) and col_base[t] + b * C.
struct AdafactorShardedScratch {
  double* row_sums;
  const int64_t* row_base;   // [n]
  double* col_sums;
  const int64_t* col_base;   // [n]
  const int64_t* full_rows;  // [n] the whole tensors' R and C (the means' divisors)
  const int64_t* full_cols;
  double* rv_sums;           // [n_slices]
};
const char* adafactor_sharded_cuda(int phase, const TensorTable& tt, const AdafactorLayout* layout,
                                   const int64_t* chunk_first, const AdafactorHyper& h, DType param_dtype,
                                   DType state_dtype, bool has_master, const AdafactorScratch& scratch,
                                   const AdafactorShardedScratch& sharded, void* stream);

// One Adafactor step of a bucket on `stream` (steps already advanced):
// `layout` for factored tensors, null for 0-d / 1-d ones. `chunk_first` [n + 1]:
// each tensor's first chunk. Returns null or the CUDA error.
const char* adafactor_cuda(const TensorTable& tt, const AdafactorLayout* layout, const int64_t* chunk_first,
                           const AdafactorHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                           bool fp8_exp_avg, const AdafactorScratch& scratch, void* stream);

}  // namespace fusedopt
