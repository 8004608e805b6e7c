// Adafactor on the local shards of DTensor params (fusedopt/dtensor.py): the
// factored statistics of a sharded matrix are sums over every rank's shard,
// so the step goes in phases with collectives (made by the Python side)
// between them, one launch each over all tensors of the bucket:
//
//   sums     row sums and column sums of g*g per local row / column, sum(p*p)
//            (advances the steps)             -> summed over the shards of the other dim
//   factors  row_var, col_var updated from the whole rows' and columns' means;
//            the sum of row_var over the local rows of each slice  -> over the row shards
//   unorm    sum(u*u)                                              -> over every shard
//   update   the update, with the scale of the whole tensor
//
// Unlike the fused launch (adafactor.cpp) there are no waves (a wave would
// have to stop for every collective) and sum(u*u) is summed element by
// element. `dims` holds per tensor the batch count B, the local R and C and
// the whole tensor's R and C (the means' divisors); a local shard may be
// empty (its replicated statistics are still updated). Rows and columns are
// laid out tensor after tensor, slice after slice, in the sums arrays.
#include <algorithm>
#include <cmath>
#include <vector>

#include "adafactor_element.h"
#include "fusedopt/adafactor.h"
#include "fusedopt/dispatch.h"
#include "parallel.h"

namespace fusedopt {
namespace {

using namespace adafactor_cpu;  // NOLINT: the shared per-step and per-element pieces

struct Task {
  int64_t tensor, batch, row0, nrows, col_offset;  // col_offset: where its column partials start
};

// Where each tensor's rows, columns and slices start in the flat arrays, and
// the row tasks (whole rows of one slice, about chunk_size elements).
struct Layout {
  std::vector<int64_t> B, R, C, R_full, C_full, row_base, col_base, slice_base, first_task;
  std::vector<Task> tasks;
  int64_t n_rows = 0, n_cols = 0, n_slices = 0, col_total = 0;

  Layout(const TensorTable& tt, const int64_t* dims) {
    const size_t n = size_t(tt.n_tensors);
    for (auto* v : {&B, &R, &C, &R_full, &C_full, &row_base, &col_base, &slice_base}) v->resize(n);
    first_task.resize(n + 1);
    for (size_t t = 0; t < n; ++t) {
      B[t] = dims[5 * t];
      R[t] = dims[5 * t + 1];
      C[t] = dims[5 * t + 2];
      R_full[t] = dims[5 * t + 3];
      C_full[t] = dims[5 * t + 4];
      row_base[t] = n_rows;
      col_base[t] = n_cols;
      slice_base[t] = n_slices;
      n_rows += B[t] * R[t];
      n_cols += B[t] * C[t];
      n_slices += B[t];
      first_task[t] = int64_t(tasks.size());
      const int64_t per_task = std::max<int64_t>(1, tt.chunk_size / std::max<int64_t>(C[t], 1));
      for (int64_t b = 0; b < B[t]; ++b)
        for (int64_t r0 = 0; r0 < R[t]; r0 += per_task) {
          tasks.push_back({int64_t(t), b, r0, std::min(per_task, R[t] - r0), col_total});
          col_total += C[t];
        }
    }
    first_task[n] = int64_t(tasks.size());
  }

  // out[t] = the sum of tensor t's tasks' partials, in task order.
  void per_tensor(const std::vector<double>& partials, double* out) const {
    for (size_t t = 0; t + 1 < first_task.size(); ++t) {
      double sum = 0.0;
      for (int64_t k = first_task[t]; k < first_task[t + 1]; ++k) sum += partials[size_t(k)];
      out[t] = sum;
    }
  }

  // The tensor of flat slice i.
  int64_t tensor_of_slice(int64_t i) const {
    return std::upper_bound(slice_base.begin(), slice_base.end(), i) - slice_base.begin() - 1;
  }
};

// u's row and column factors of every slice (adafactor.h: factored_u), from
// the updated row_var and col_var and the row mean of each slice (the sums of
// row_var over its whole rows, rv_sums).
template <typename T, typename S>
struct Factors {
  std::vector<T> rowq, rrow, colv, rcol;

  Factors(const TensorTable& tt, const Layout& L, const double* rv_sums, T eps1, int num_threads)
      : rowq(size_t(L.n_rows)), rrow(size_t(L.n_rows)), colv(size_t(L.n_cols)), rcol(size_t(L.n_cols)) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < L.n_slices; ++i) {
      const int64_t t = L.tensor_of_slice(i), b = i - L.slice_base[size_t(t)];
      const int64_t R = L.R[size_t(t)], C = L.C[size_t(t)];
      const T rmean = clamp_min(T(rv_sums[i] / double(L.R_full[size_t(t)])), eps1);
      const S* row_var = tt.ptr<const S>(kAfRowVar, t) + b * R;
      const S* col_var = tt.ptr<const S>(kAfColVar, t) + b * C;
      T* rq = rowq.data() + L.row_base[size_t(t)] + b * R;
      T* rr = rrow.data() + L.row_base[size_t(t)] + b * R;
      for (int64_t r = 0; r < R; ++r) {
        rq[r] = T(to_math(row_var[r])) / rmean;
        rr[r] = T(1) / sqrt(rq[r]);
      }
      T* cv = colv.data() + L.col_base[size_t(t)] + b * C;
      T* rc = rcol.data() + L.col_base[size_t(t)] + b * C;
      for (int64_t c = 0; c < C; ++c) {
        cv[c] = T(to_math(col_var[c]));
        rc[c] = T(1) / sqrt(cv[c]);
      }
    }
  }
};

template <typename T>
T grad_multiplier(const AdafactorHyper& h) {
  return (h.grad_mult ? T(*h.grad_mult) : T(1)) * (h.maximize ? T(-1) : T(1));
}

// Phase "sums" (advances the steps).
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct Sums {
  static void run(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h, int num_threads,
                  double* row_sums, double* col_sums, double* p_sq) {
    using T = typename MathOf<P>::type;
    advance_steps(tt, h);
    const Layout L(tt, dims);
    const T mult = grad_multiplier<T>(h);
    const int64_t n_tasks = int64_t(L.tasks.size());
    std::vector<T> col_partial(size_t(L.col_total));
    std::vector<double> p_partial(static_cast<size_t>(n_tasks));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; ++k) {
      const Task& task = L.tasks[size_t(k)];
      const int64_t t = task.tensor, R = L.R[size_t(t)], C = L.C[size_t(t)];
      const int64_t first = (task.batch * R + task.row0) * C;
      const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + first;
      const Weights<P, MASTER, REM, false> weights(tt, kAfParam, kAfMaster, t, first, 0u);  // read only
      T* __restrict__ colp = col_partial.data() + task.col_offset;
      std::fill(colp, colp + C, T(0));
      double p_acc = 0.0;
      for (int64_t j = 0; j < task.nrows; ++j) {
        T g2 = T(0), p2 = T(0);
#pragma omp simd reduction(+ : g2, p2)
        for (int64_t c = 0; c < C; ++c) {
          const T x = T(to_math(grad[j * C + c])) * mult;
          const T w = weights.template load<T>(j * C + c);
          g2 += x * x;
          p2 += w * w;
          colp[c] += x * x;
        }
        row_sums[L.row_base[size_t(t)] + task.batch * R + task.row0 + j] = double(g2);
        p_acc += double(p2);
      }
      p_partial[size_t(k)] = p_acc;
    }
    // per slice, its tasks' column partials in task order; per tensor, its p partials in task order
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < L.n_slices; ++i) {
      const int64_t t = L.tensor_of_slice(i), b = i - L.slice_base[size_t(t)], C = L.C[size_t(t)];
      double* out = col_sums + L.col_base[size_t(t)] + b * C;
      std::fill(out, out + C, 0.0);
      for (int64_t k = L.first_task[size_t(t)]; k < L.first_task[size_t(t) + 1]; ++k) {
        if (L.tasks[size_t(k)].batch != b) continue;
        const T* colp = col_partial.data() + L.tasks[size_t(k)].col_offset;
        for (int64_t c = 0; c < C; ++c) out[c] += double(colp[c]);
      }
    }
    L.per_tensor(p_partial, p_sq);
  }
};

// Phase "factors": row_var and col_var from the whole rows' and columns' sums; the sum of row_var over the
// local rows of each slice.
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct UpdateFactors {
  static void run(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h, int num_threads,
                  const double* row_sums, const double* col_sums, double* rv_sums) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = step_scalars(tt, h);
    const Layout L(tt, dims);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < L.n_slices; ++i) {
      const int64_t t = L.tensor_of_slice(i), b = i - L.slice_base[size_t(t)];
      const int64_t R = L.R[size_t(t)], C = L.C[size_t(t)];
      const T w = T(steps[size_t(t)].one_minus_beta2_t);
      S* row_var = tt.ptr<S>(kAfRowVar, t) + b * R;
      S* col_var = tt.ptr<S>(kAfColVar, t) + b * C;
      const double* rows = row_sums + L.row_base[size_t(t)] + b * R;
      const double* cols = col_sums + L.col_base[size_t(t)] + b * C;
      double sum = 0.0;
      for (int64_t r = 0; r < R; ++r) {
        row_var[r] = Store<S>::from(lerp(T(to_math(row_var[r])), T(rows[r] / double(L.C_full[size_t(t)])), w));
        sum += double(to_math(row_var[r]));  // as stored, as the fused launch's mean reads it
      }
      for (int64_t c = 0; c < C; ++c)
        col_var[c] = Store<S>::from(lerp(T(to_math(col_var[c])), T(cols[c] / double(L.R_full[size_t(t)])), w));
      rv_sums[i] = sum;
    }
  }
};

// Phase "unorm": sum(u*u) per tensor, element by element.
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct Unorm {
  static void run(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h, int num_threads,
                  const double* rv_sums, double* u_sq) {
    using T = typename MathOf<P>::type;
    const Layout L(tt, dims);
    const T eps1_sq = T(h.eps1 * h.eps1), inv_eps1 = T(1.0 / h.eps1), mult = grad_multiplier<T>(h);
    const Factors<T, S> f(tt, L, rv_sums, T(h.eps1), num_threads);
    const int64_t n_tasks = int64_t(L.tasks.size());
    std::vector<double> u_partial(static_cast<size_t>(n_tasks));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; ++k) {
      const Task& task = L.tasks[size_t(k)];
      const int64_t t = task.tensor, R = L.R[size_t(t)], C = L.C[size_t(t)];
      const T* __restrict__ cv = f.colv.data() + L.col_base[size_t(t)] + task.batch * C;
      const T* __restrict__ rc = f.rcol.data() + L.col_base[size_t(t)] + task.batch * C;
      double acc = 0.0;
      for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
        const int64_t row = L.row_base[size_t(t)] + task.batch * R + r;
        const T rq = f.rowq[size_t(row)], rr = f.rrow[size_t(row)];
        const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + (task.batch * R + r) * C;
        acc += double(row_u_squares(grad, C, mult, rq, rr, cv, rc, eps1_sq, inv_eps1));
      }
      u_partial[size_t(k)] = acc;
    }
    L.per_tensor(u_partial, u_sq);
  }
};

// Phase "update": p (and with beta1 exp_avg) from u and the whole tensors' sum(p*p), sum(u*u) over numel.
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct Update {
  static void run(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h, int num_threads,
                  const double* rv_sums, const double* p_sq, const double* u_sq, const int64_t* numel) {
    if constexpr (M8) {
      return;  // block-scaled FP8 states are refused on DTensor params (fusedopt/optim/base.py)
    } else {
      using T = typename MathOf<P>::type;
      const std::vector<AdafactorStep> steps = step_scalars(tt, h);
      const Layout L(tt, dims);
      const T eps1_sq = T(h.eps1 * h.eps1), inv_eps1 = T(1.0 / h.eps1), mult = grad_multiplier<T>(h);
      const T m_weight = T(1.0 - h.beta1);
      const Factors<T, S> f(tt, L, rv_sums, T(h.eps1), num_threads);
      const int64_t n_tasks = int64_t(L.tasks.size());
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
      for (int64_t k = 0; k < n_tasks; ++k) {
        const Task& task = L.tasks[size_t(k)];
        const int64_t t = task.tensor, R = L.R[size_t(t)], C = L.C[size_t(t)];
        const T decay = T(steps[size_t(t)].decay);
        const T s = T(tensor_scale(h, steps[size_t(t)], p_sq[t], u_sq[t], numel[t]));
        const T* __restrict__ cv = f.colv.data() + L.col_base[size_t(t)] + task.batch * C;
        const T* __restrict__ rc = f.rcol.data() + L.col_base[size_t(t)] + task.batch * C;
        const Weights<P, MASTER, REM, SR> w(tt, kAfParam, kAfMaster, t, 0, h.sr.seed);
        S* __restrict__ exp_avg = BETA1 ? tt.ptr<S>(kAfExpAvg, t) : nullptr;
        const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t);
        for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
          const int64_t row = L.row_base[size_t(t)] + task.batch * R + r;
          const T rq = f.rowq[size_t(row)], rr = f.rrow[size_t(row)];
          const int64_t o = (task.batch * R + r) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T u = factored_u(T(to_math(grad[o + c])) * mult, rq, rr, cv[c], rc[c], eps1_sq, inv_eps1);
            apply_element<T, S, BETA1>(w, exp_avg, o + c, u, decay, s, m_weight);
          }
        }
      }
    }
  }
};

// Pass<P, S, MASTER, REM, BETA1, SR, false>::run(args...) for the launch's remainders, beta1 and stochastic
// rounding.
template <template <typename, typename, bool, bool, bool, bool, bool> class Pass>
struct Switches {
  template <typename P, typename S, bool MASTER>
  struct Op {
    template <bool REM, bool SR, typename... Args>
    static void run_sr(const AdafactorHyper& h, Args&&... args) {
      if (h.has_beta1) Pass<P, S, MASTER, REM, true, SR, false>::run(args...);
      else Pass<P, S, MASTER, REM, false, SR, false>::run(args...);
    }
    template <typename... Args>
    static void run(const AdafactorHyper& h, Args&&... args) {
      if constexpr (kStochasticRoundable<P, MASTER>) {
        if (h.sr.on) return run_sr<false, true>(h, args...);
      }
      with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_sr<decltype(rem)::value, false>(h, args...); });
    }
  };
};

bool skipped(const AdafactorHyper& h) { return h.found_inf && *h.found_inf != 0.0f; }

}  // namespace

void adafactor_sharded_sums_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                double* row_sums, double* col_sums, double* p_sq) {
  const Layout L(tt, dims);
  std::fill(row_sums, row_sums + L.n_rows, 0.0);
  std::fill(col_sums, col_sums + L.n_cols, 0.0);
  std::fill(p_sq, p_sq + tt.n_tensors, 0.0);
  if (skipped(h) || tt.n_tensors == 0) return;  // zeros for the collectives; nothing changes
  dispatch_storage<Switches<Sums>::Op>(param_dtype, state_dtype, has_master, h, tt, dims, h, num_threads, row_sums,
                                       col_sums, p_sq);
}

void adafactor_sharded_factors_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                   DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                   const double* row_sums, const double* col_sums, double* rv_sums) {
  const Layout L(tt, dims);
  std::fill(rv_sums, rv_sums + L.n_slices, 0.0);
  if (skipped(h) || tt.n_tensors == 0) return;
  dispatch_storage<Switches<UpdateFactors>::Op>(param_dtype, state_dtype, has_master, h, tt, dims, h, num_threads,
                                                row_sums, col_sums, rv_sums);
}

void adafactor_sharded_unorm_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                 DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                 const double* rv_sums, double* u_sq) {
  std::fill(u_sq, u_sq + tt.n_tensors, 0.0);
  if (skipped(h) || tt.n_tensors == 0) return;
  dispatch_storage<Switches<Unorm>::Op>(param_dtype, state_dtype, has_master, h, tt, dims, h, num_threads, rv_sums,
                                        u_sq);
}

void adafactor_sharded_update_cpu(const TensorTable& tt, const int64_t* dims, const AdafactorHyper& h,
                                  DType param_dtype, DType state_dtype, bool has_master, int num_threads,
                                  const double* rv_sums, const double* p_sq, const double* u_sq,
                                  const int64_t* numel) {
  if (skipped(h) || tt.n_tensors == 0) return;
  dispatch_storage<Switches<Update>::Op>(param_dtype, state_dtype, has_master, h, tt, dims, h, num_threads, rv_sums,
                                         p_sq, u_sq, numel);
}

}  // namespace fusedopt
