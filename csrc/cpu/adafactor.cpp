// Adafactor on the CPU (include/fusedopt/adafactor.h). Every pass is one
// OpenMP region over all tensors of the launch:
//
// factored tensors ([.., R, C], contiguous) are cut into tasks of whole rows
// of one batch slice, so a task's row sums are final (row_var is updated in
// place) and its column sums are partials, combined per slice in task order;
//   pass 1: row sums and column partials of g*g, sum(p*p)    (reads g, p)
//   pass 2: col_var from the partials, mean of row_var per slice
//   pass 3: sum(u*u)                                        (reads g)
//   pass 4: the update                                      (reads g, p; writes p)
// 0-d / 1-d tensors go by chunks:
//   pass 1: variance updated, sum(p*p), sum(u*u)           (reads p, g, variance; writes variance)
//   pass 2: the update                                      (reads p, g, variance; writes p)
// All sums in double, combined in a fixed order: deterministic.
#include <algorithm>
#include <vector>

#include "fusedopt/adafactor.h"
#include "fusedopt/dispatch.h"
#include "parallel.h"

namespace fusedopt {
namespace {

struct RowTask {
  int64_t tensor, batch, row0, nrows, col_offset;  // col_offset: where its column partials start
};

// Steps advanced, and the scalars that need no statistics.
std::vector<AdafactorStep> advance_steps(const TensorTable& tt, const AdafactorHyper& h) {
  const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
  std::vector<AdafactorStep> steps(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) {
    float& step = *tt.ptr<float>(kAfStep, t);
    step += 1.0f;
    steps[size_t(t)] = adafactor_step(h, lr, double(step));
  }
  return steps;
}

// Final per-element write: the update applied to p (or the master, then p).
template <typename T, typename P, typename S, bool MASTER>
inline void apply_element(P* param, float* master, S* exp_avg, int64_t i, T u, T decay, T scale, T denom,
                          T m_weight, bool has_beta1) {
  T p = MASTER ? T(master[i]) : T(to_math(param[i]));
  p = p * decay;
  if (has_beta1) {
    const T m = lerp(T(to_math(exp_avg[i])), u / denom, m_weight);
    exp_avg[i] = Store<S>::from(m);
    p = fused_mul_add(scale, T(to_math(exp_avg[i])), p);
  } else {
    p = fused_mul_add(scale, u, p);
  }
  if (MASTER) master[i] = float(p);
  param[i] = Store<P>::from(p);
}

template <typename P, typename S, bool MASTER>
struct Factored {
  static void run(const TensorTable& tt, const int64_t* rows, const int64_t* cols, const AdafactorHyper& h,
                  int num_threads) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = advance_steps(tt, h);
    // Tasks of about chunk_size elements, whole rows, never crossing a batch slice.
    std::vector<RowTask> tasks;
    std::vector<int64_t> first_task(size_t(tt.n_tensors) + 1);
    int64_t col_total = 0;
    for (int64_t t = 0; t < tt.n_tensors; ++t) {
      first_task[size_t(t)] = int64_t(tasks.size());
      const int64_t R = rows[t], C = cols[t], B = tt.numel[t] / (R * C);
      const int64_t per_task = std::max<int64_t>(1, tt.chunk_size / C);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r0 = 0; r0 < R; r0 += per_task) {
          tasks.push_back({t, b, r0, std::min(per_task, R - r0), col_total});
          col_total += C;
        }
    }
    first_task[size_t(tt.n_tensors)] = int64_t(tasks.size());
    const int64_t n_tasks = int64_t(tasks.size());
    std::vector<double> col_partial(static_cast<size_t>(col_total)), p_partial(static_cast<size_t>(n_tasks)),
        u_partial(static_cast<size_t>(n_tasks));
    const T eps1 = T(h.eps1), eps1_sq = T(h.eps1 * h.eps1);
    const T grad_mult = h.grad_mult ? T(*h.grad_mult) : T(1), sign = h.maximize ? T(-1) : T(1);
    auto grad_at = [&](const P* grad, int64_t i) { return adafactor_grad<T, true>(T(to_math(grad[i])), grad_mult, sign); };

    // pass 1: row sums (final: row_var updated), column partials, sum(p*p)
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; ++k) {
      const RowTask& task = tasks[size_t(k)];
      const int64_t C = cols[task.tensor], R = rows[task.tensor];
      const P* param = tt.ptr<const P>(kAfParam, task.tensor);
      const float* master = MASTER ? tt.ptr<const float>(kAfMaster, task.tensor) : nullptr;
      const P* grad = tt.ptr<const P>(kAfGrad, task.tensor);
      S* row_var = tt.ptr<S>(kAfRowVar, task.tensor);
      double* colp = col_partial.data() + task.col_offset;
      const T w = T(steps[size_t(task.tensor)].one_minus_beta2_t);
      double p_acc = 0.0;
      for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
        const int64_t base = (task.batch * R + r) * C;
        double row_acc = 0.0;
#pragma omp simd reduction(+ : row_acc, p_acc)
        for (int64_t c = 0; c < C; ++c) {
          const T g = grad_at(grad, base + c);
          const double g2 = double(g * g);
          row_acc += g2;
          colp[c] += g2;
          const T p = MASTER ? T(master[base + c]) : T(to_math(param[base + c]));
          p_acc += double(p) * double(p);
        }
        S& rv = row_var[task.batch * R + r];
        rv = Store<S>::from(lerp(T(to_math(rv)), T(row_acc / double(C)), w));
      }
      p_partial[size_t(k)] = p_acc;
    }

    // pass 2: col_var per batch slice from the partials in task order; mean of row_var
    std::vector<std::pair<int64_t, int64_t>> slices;  // (tensor, batch)
    for (int64_t t = 0; t < tt.n_tensors; ++t)
      for (int64_t b = 0; b < tt.numel[t] / (rows[t] * cols[t]); ++b) slices.emplace_back(t, b);
    std::vector<double> row_mean(slices.size());
    std::vector<int64_t> first_slice(size_t(tt.n_tensors) + 1, 0);
    for (size_t i = slices.size(); i-- > 0;) first_slice[size_t(slices[i].first)] = int64_t(i);
    first_slice[size_t(tt.n_tensors)] = int64_t(slices.size());
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(slices.size()); ++i) {
      const int64_t t = slices[size_t(i)].first, b = slices[size_t(i)].second;
      const int64_t R = rows[t], C = cols[t];
      const T w = T(steps[size_t(t)].one_minus_beta2_t);
      S* col_var = tt.ptr<S>(kAfColVar, t) + b * C;
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0;
        for (int64_t k = first_task[size_t(t)]; k < first_task[size_t(t) + 1]; ++k)
          if (tasks[size_t(k)].batch == b) sum += col_partial[size_t(tasks[size_t(k)].col_offset + c)];
        col_var[c] = Store<S>::from(lerp(T(to_math(col_var[c])), T(sum / double(R)), w));
      }
      const S* row_var = tt.ptr<const S>(kAfRowVar, t) + b * R;
      double sum = 0.0;
      for (int64_t r = 0; r < R; ++r) sum += double(to_math(row_var[r]));
      row_mean[size_t(i)] = double(clamp_min(T(sum / double(R)), eps1));
    }

    // pass 3: sum(u*u)
    auto u_at = [&](const RowTask& task, const S* row_var, const S* col_var, double rmean, const P* grad, int64_t r,
                    int64_t c) {
      const int64_t R = rows[task.tensor], C = cols[task.tensor];
      const T var_est = T(to_math(row_var[task.batch * R + r])) * T(to_math(col_var[task.batch * C + c])) / T(rmean);
      return adafactor_u(grad_at(grad, (task.batch * R + r) * C + c), var_est, eps1_sq);
    };
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; ++k) {
      const RowTask& task = tasks[size_t(k)];
      const int64_t t = task.tensor, C = cols[t];
      const S* row_var = tt.ptr<const S>(kAfRowVar, t);
      const S* col_var = tt.ptr<const S>(kAfColVar, t);
      const double rmean = row_mean[size_t(first_slice[size_t(t)] + task.batch)];
      const P* grad = tt.ptr<const P>(kAfGrad, t);
      double u_acc = 0.0;
      for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
#pragma omp simd reduction(+ : u_acc)
        for (int64_t c = 0; c < C; ++c) {
          const T u = u_at(task, row_var, col_var, rmean, grad, r, c);
          u_acc += double(u) * double(u);
        }
      }
      u_partial[size_t(k)] = u_acc;
    }

    // per-tensor alpha and denom, then pass 4: the update
    std::vector<double> scale(static_cast<size_t>(tt.n_tensors)), denoms(static_cast<size_t>(tt.n_tensors));
    for (int64_t t = 0; t < tt.n_tensors; ++t) {
      double p_sq = 0.0, u_sq = 0.0;
      for (int64_t k = first_task[size_t(t)]; k < first_task[size_t(t) + 1]; ++k) {
        p_sq += p_partial[size_t(k)];
        u_sq += u_partial[size_t(k)];
      }
      double alpha, denom;
      adafactor_scale(h, steps[size_t(t)], p_sq, u_sq, double(tt.numel[t]), &alpha, &denom);
      scale[size_t(t)] = h.has_beta1 ? -alpha : -alpha / denom;
      denoms[size_t(t)] = denom;
    }
    const T m_weight = T(1.0 - h.beta1);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; ++k) {
      const RowTask& task = tasks[size_t(k)];
      const int64_t t = task.tensor, C = cols[t];
      const S* row_var = tt.ptr<const S>(kAfRowVar, t);
      const S* col_var = tt.ptr<const S>(kAfColVar, t);
      const double rmean = row_mean[size_t(first_slice[size_t(t)] + task.batch)];
      const P* grad = tt.ptr<const P>(kAfGrad, t);
      P* param = tt.ptr<P>(kAfParam, t);
      float* master = MASTER ? tt.ptr<float>(kAfMaster, t) : nullptr;
      S* exp_avg = h.has_beta1 ? tt.ptr<S>(kAfExpAvg, t) : nullptr;
      const T decay = T(steps[size_t(t)].decay), s = T(scale[size_t(t)]), denom = T(denoms[size_t(t)]);
      for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
        const int64_t base = (task.batch * rows[t] + r) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T u = u_at(task, row_var, col_var, rmean, grad, r, c);
          apply_element<T, P, S, MASTER>(param, master, exp_avg, base + c, u, decay, s, denom, m_weight, h.has_beta1);
        }
      }
    }
  }
};

template <typename P, typename S, bool MASTER>
struct Vector {
  static void run(const TensorTable& tt, const AdafactorHyper& h, int num_threads) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = advance_steps(tt, h);
    std::vector<double> p_partial(size_t(tt.n_chunks)), u_partial(size_t(tt.n_chunks));
    const T eps1_sq = T(h.eps1 * h.eps1);
    const T grad_mult = h.grad_mult ? T(*h.grad_mult) : T(1), sign = h.maximize ? T(-1) : T(1);

    // pass 1: variance updated (as stored: u is formed from what was written), sum(p*p), sum(u*u)
    parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
      const int64_t t = chunk.tensor;
      const P* param = tt.ptr<const P>(kAfParam, t) + chunk.start;
      const float* master = MASTER ? tt.ptr<const float>(kAfMaster, t) + chunk.start : nullptr;
      const P* grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
      S* variance = tt.ptr<S>(kAfVariance, t) + chunk.start;
      const T w = T(steps[size_t(t)].one_minus_beta2_t);
      double p_acc = 0.0, u_acc = 0.0;
#pragma omp simd reduction(+ : p_acc, u_acc)
      for (int64_t i = 0; i < chunk.len; ++i) {
        const T g = adafactor_grad<T, true>(T(to_math(grad[i])), grad_mult, sign);
        variance[i] = Store<S>::from(lerp(T(to_math(variance[i])), g * g, w));
        const T u = adafactor_u(g, T(to_math(variance[i])), eps1_sq);
        const T p = MASTER ? T(master[i]) : T(to_math(param[i]));
        p_acc += double(p) * double(p);
        u_acc += double(u) * double(u);
      }
      p_partial[size_t(c)] = p_acc;
      u_partial[size_t(c)] = u_acc;
    });

    std::vector<double> p_sq(size_t(tt.n_tensors), 0.0), u_sq(size_t(tt.n_tensors), 0.0);
    for (int64_t c = 0; c < tt.n_chunks; ++c) {  // a tensor's chunks are consecutive: chunk order
      p_sq[size_t(tt.chunk_tensor[c])] += p_partial[size_t(c)];
      u_sq[size_t(tt.chunk_tensor[c])] += u_partial[size_t(c)];
    }
    std::vector<double> scale(static_cast<size_t>(tt.n_tensors)), denoms(static_cast<size_t>(tt.n_tensors));
    for (int64_t t = 0; t < tt.n_tensors; ++t) {
      double alpha, denom;
      adafactor_scale(h, steps[size_t(t)], p_sq[size_t(t)], u_sq[size_t(t)], double(tt.numel[t]), &alpha, &denom);
      scale[size_t(t)] = h.has_beta1 ? -alpha : -alpha / denom;
      denoms[size_t(t)] = denom;
    }

    // pass 2: the update
    const T m_weight = T(1.0 - h.beta1);
    parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
      const int64_t t = chunk.tensor;
      P* param = tt.ptr<P>(kAfParam, t) + chunk.start;
      float* master = MASTER ? tt.ptr<float>(kAfMaster, t) + chunk.start : nullptr;
      const P* grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
      const S* variance = tt.ptr<const S>(kAfVariance, t) + chunk.start;
      S* exp_avg = h.has_beta1 ? tt.ptr<S>(kAfExpAvg, t) + chunk.start : nullptr;
      const T decay = T(steps[size_t(t)].decay), s = T(scale[size_t(t)]), denom = T(denoms[size_t(t)]);
#pragma omp simd
      for (int64_t i = 0; i < chunk.len; ++i) {
        const T g = adafactor_grad<T, true>(T(to_math(grad[i])), grad_mult, sign);
        const T u = adafactor_u(g, T(to_math(variance[i])), eps1_sq);
        apply_element<T, P, S, MASTER>(param, master, exp_avg, i, u, decay, s, denom, m_weight, h.has_beta1);
      }
    });
  }
};

template <typename P, typename S, bool MASTER>
struct FactoredOp {
  static void run(const TensorTable& tt, const int64_t* rows, const int64_t* cols, const AdafactorHyper& h, int n) {
    Factored<P, S, MASTER>::run(tt, rows, cols, h, n);
  }
};

template <typename P, typename S, bool MASTER>
struct VectorOp {
  static void run(const TensorTable& tt, const AdafactorHyper& h, int n) { Vector<P, S, MASTER>::run(tt, h, n); }
};

}  // namespace

void adafactor_factored_cpu(const TensorTable& tt, const int64_t* rows, const int64_t* cols,
                            const AdafactorHyper& h, DType param_dtype, bool has_master, int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step, steps too
  if (tt.n_tensors == 0) return;
  dispatch_storage<FactoredOp>(param_dtype, has_master, tt, rows, cols, h, num_threads);
}

void adafactor_vector_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype, bool has_master,
                          int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;
  if (tt.n_tensors == 0) return;
  dispatch_storage<VectorOp>(param_dtype, has_master, tt, h, num_threads);
}

}  // namespace fusedopt
