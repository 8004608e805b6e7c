// Adafactor on the CPU (include/fusedopt/adafactor.h). Every pass is one
// OpenMP region over many tensors of the launch:
//
// factored tensors ([.., R, C], contiguous) are cut into tasks of whole rows
// of one batch slice, so a task's row sums are final (row_var is updated in
// place) and its column sums are partials, combined per slice in task order;
// they go in waves of consecutive tensors of about 8 MB of g and p, each
// wave through these passes before the next (its update then finds g and p
// in cache), pass 1 and the update giving each task to the same thread:
//   pass 1: row sums and column partials of g*g, sum(p*p)    (reads g, p)
//           and, once the row_vars of a block of rows are final, its column
//           partials of g*g / row_var (the block still in L1)
//   pass 2: col_var from the partials, mean of row_var per slice, and u's
//           row and column factors (u = g * rsqrt(row / rmean) * rsqrt(col),
//           so no division or square root is left per element); sum(u*u)
//           of the slice from the partials when no element is clamped
//   pass 3: sum(u*u) of the other slices                    (reads g)
//   pass 4: the update                                      (reads g, p; writes p)
// Pass 3 is where exact Adafactor reads the grads a third time. Without the
// clamp, u^2 = g^2 * rmean / (row_var * col_var), so the slice's sum(u*u) is
// rmean * sum_c (sum_r g^2 / row_var) / col_var: pass 1 collects the inner
// sums from the rows it has in cache, and pass 2 forms it, up to rounding,
// when no element with g^2 > 0 is clamped (min rowq * min col_var >= eps1^2
// over the rows and columns that have one: a monotone bound) and every
// row_var and col_var is finite. Elements whose g^2 underflows to 0 are left
// out (their u^2 is below 2^-104), and so is the rare slice that fails the
// test: pass 3 sums it element by element.
// 0-d / 1-d tensors go by chunks:
//   pass 1: variance updated, sum(p*p), sum(u*u)           (reads p, g, variance; writes variance)
//   pass 2: the update                                      (reads p, g, variance; writes p)
// All sums in double, combined in a fixed order: deterministic.
// With a block-scaled FP8 exp_avg (M8) the update pass goes by the launch's
// chunks (multiples of kQBlock) through fp8_blocks.h: each block's new first
// moments are formed, encoded with the block's new scale, and the params are
// updated from the moments as stored.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "adafactor_element.h"
#include "fp8_blocks.h"
#include "fusedopt/adafactor.h"
#include "fusedopt/dispatch.h"
#include "parallel.h"
#include "prefetch.h"

namespace fusedopt {
namespace {

using namespace adafactor_cpu;  // NOLINT: the shared per-step and per-element pieces

struct RowTask {
  int64_t tensor, batch, row0, nrows, col_offset;  // col_offset: where its column partials start
};

// Ask for the lines a few KB ahead of row `o` (C elements) of each stream
// a pass reads: g, p (or the master) and, with BETA1, exp_avg. Pass 1 and
// the update use it. From memory, with the caches full of other data, the
// update took ~6% less time with them (gpt2-d256-L4's matrices,
// bench/native/adafactor_ab.cpp with AB_FLUSH=1).
template <bool BETA1, typename P, typename W, typename S>
inline void prefetch_row(const P* grad, const W& w, const S* exp_avg, int64_t o, int64_t C) {
  prefetch_ahead(grad + o, C * int64_t(sizeof(P)));
  if constexpr (W::kStaged) prefetch_ahead(w.master + o, C * int64_t(sizeof(float)));
  else prefetch_ahead(w.param + o, C * int64_t(sizeof(P)));
  if constexpr (W::kRemainder) prefetch_ahead(w.rem + o, C * int64_t(sizeof(int16_t)));
  if constexpr (BETA1) prefetch_ahead(exp_avg + o, C * int64_t(sizeof(S)));
}

// The update of one chunk with exp_avg block-scaled FP8 (fp8_blocks.h): per
// block of kQBlock elements, fill(b0, n, m_out, m_in, m_scale) writes the new
// first moments of elements [b0, b0 + n) of the chunk into m_out (from the
// stored ones, m_in[i] with m_scale); they are encoded with the block's new
// scale, and the params move by them as stored: p = p * decay - m.
template <typename T, typename P, bool MASTER, bool REM, bool SR, typename Fill>
inline void fp8_moment_chunk(const TensorTable& tt, const Chunk& chunk, T decay, uint32_t sr_seed, Fill&& fill) {
  const int64_t t = chunk.tensor;
  const Weights<P, MASTER, REM, SR> w(tt, kAfParam, kAfMaster, t, chunk.start, sr_seed);
  uint8_t* const q[1] = {tt.ptr<uint8_t>(kAfExpAvg, t) + chunk.start};
  float* const q_scales[1] = {tt.ptr<float>(kAfExpAvgScale, t) + chunk.start / kQBlock};
  q8_store_blocks<1>(
      chunk.len, q, q_scales,
      [&](int64_t b0, int64_t n, float (*out)[kQBlock]) { fill(b0, n, out[0], q[0] + b0, q_scales[0][b0 / kQBlock]); },
      [&](int64_t b0, int64_t n) {
        const float m_scale = q_scales[0][b0 / kQBlock];
#pragma omp simd
        for (int64_t i = b0; i < b0 + n; ++i) {
          write_param(w, i, T(q8_decode<false>(q[0][i], m_scale)), decay, T(-1));
        }
      });
}

// Elements [first, first + n) of a [rows, C] row-major view, as row segments:
// body(row, c0, len, o) for columns [c0, c0 + len) of `row`, o = their offset from `first`.
template <typename Body>
inline void for_row_segments(int64_t first, int64_t n, int64_t C, Body&& body) {
  for (int64_t o = 0; o < n;) {
    const int64_t row = (first + o) / C, c0 = (first + o) - row * C;
    const int64_t len = std::min(C - c0, n - o);
    body(row, c0, len, o);
    o += len;
  }
}

// Pass 1's row sums over NR (1 or 2) rows of C elements at `base` and
// `base + gap`: each row's sums of g^2 and of p^2 (p: the master with master
// weights), of the weights w (weights.h).
template <typename T>
struct RowSquares {
  T g2[2], p2[2];
};

template <int NR, typename T, typename P, typename W>
inline RowSquares<T> row_squares(const P* grad, const W& w, int64_t base, int64_t gap, int64_t C, T mult) {
  static_assert(NR == 1 || NR == 2, "row_squares takes 1 or 2 rows");
  const P* __restrict__ g0 = grad + base;
  const P* __restrict__ g1 = grad + base + gap;
  const W w0 = w.offset(base), w1 = w.offset(base + gap);
  // a read-only pass: the lines a few KB ahead are requested (prefetch.h)
  for (int i = 0; i < NR; ++i) prefetch_row<false>(grad, w, static_cast<const float*>(nullptr), base + i * gap, C);
  T a0 = T(0), a1 = T(0), q0 = T(0), q1 = T(0);  // named, not arrays: OpenMP array reductions go through memory
#pragma omp simd reduction(+ : a0, a1, q0, q1)
  for (int64_t c = 0; c < C; ++c) {
    const T x0 = T(to_math(g0[c])) * mult;
    a0 += x0 * x0;
    const T x0w = w0.template load<T>(c);
    q0 += x0w * x0w;
    if constexpr (NR == 2) {
      const T x1 = T(to_math(g1[c])) * mult;
      a1 += x1 * x1;
      const T x1w = w1.template load<T>(c);
      q1 += x1w * x1w;
    }
  }
  return {{a0, a1}, {q0, q1}};
}

// Pass 1's column sums over a block of rows whose row sums are done: for
// the n rows at g (C apart, weights wa) and, NR = 2, the n at g + gap (wb), colp[c]
// += sum_r g^2 and colh[c] += sum_r g^2 * w_r, each loaded and stored once
// per block (per row, their loads and stores cost pass 1 more than its
// memory traffic when memory is fast: bench/native/adafactor_pass1.cpp).
template <int NR, int64_t W, typename T, typename P>
inline void column_squares_block(const P* g, int64_t gap, int64_t n, int64_t C, T mult, const T* wa, const T* wb,
                                 T* __restrict__ colp, T* __restrict__ colh) {
  T sp[W] = {}, sh[W] = {};  // W columns' sums, in registers
  for (int64_t j = 0; j < n; ++j) {
    const P* __restrict__ ga = g + j * C;
    const P* __restrict__ gb = g + gap + j * C;
    const T a = wa[j], b = NR == 2 ? wb[j] : T(0);
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) {
      const T xa = T(to_math(ga[l])) * mult;
      const T sa = xa * xa;
      if constexpr (NR == 2) {
        const T xb = T(to_math(gb[l])) * mult;
        const T sb = xb * xb;
        sp[l] += sa + sb;
        sh[l] += sa * a;
        sh[l] += sb * b;
      } else {
        sp[l] += sa;
        sh[l] += sa * a;
      }
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < W; ++l) {
    colp[l] += sp[l];
    colh[l] += sh[l];
  }
}

template <int NR, typename T, typename P>
inline void column_squares(const P* g, int64_t gap, int64_t n, int64_t C, T mult, const T* wa, const T* wb,
                           T* __restrict__ colp, T* __restrict__ colh) {
  static_assert(NR == 1 || NR == 2, "column_squares takes 1 or 2 groups of rows");
  constexpr int64_t V = 64 / sizeof(T), W = 4 * V;  // a 512-bit vector, four of them
  int64_t c0 = 0;
  for (; c0 + W <= C; c0 += W) column_squares_block<NR, W>(g + c0, gap, n, C, mult, wa, wb, colp + c0, colh + c0);
  for (; c0 + V <= C; c0 += V) column_squares_block<NR, V>(g + c0, gap, n, C, mult, wa, wb, colp + c0, colh + c0);
  for (; c0 < C; ++c0) column_squares_block<NR, 1>(g + c0, gap, n, C, mult, wa, wb, colp + c0, colh + c0);
}

// The factored launch's scratch arrays, kept per thread for its next launch:
// fresh vectors of a few hundred KB each cost the CPU benchmark's GPT-2
// embedding 0.4 ms a step (~6% of it) in page faults, glibc mapping and
// unmapping allocations that size (bench/native/adafactor_pass1.cpp, "lib").
// A launch writes every element before it reads it, except the column
// partials, which it zeroes. Freed after a launch that needed more than kKeepBytes.
template <typename T>
struct FactoredScratch {
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  std::vector<T> col_partial, col_h, task_min_row, slice_min_col, rowq, rrow, rcol, colv;
  std::vector<double> p_partial, u_partial;
  std::vector<unsigned char> task_finite, slice_done;

  static FactoredScratch& of_this_thread() {
    static thread_local FactoredScratch scratch;
    return scratch;
  }
  void trim() {
    auto bytes = [](const auto&... v) { return (size_t(0) + ... + (v.capacity() * sizeof(v[0]))); };
    if (bytes(col_partial, col_h, task_min_row, slice_min_col, rowq, rrow, rcol, colv, p_partial, u_partial,
              task_finite, slice_done) > kKeepBytes)
      *this = FactoredScratch();
  }
};

// S: storage of the second-moment statistics, and of exp_avg unless M8 (block-scaled FP8).
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct Factored {
  static void run(const TensorTable& tt, const int64_t* rows, const int64_t* cols, const AdafactorHyper& h,
                  int num_threads) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = advance_steps(tt, h);
    // Tasks of about chunk_size elements, whole rows, never crossing a batch slice;
    // per tensor its first task, first slice and first row/column factor.
    std::vector<RowTask> tasks;
    std::vector<int64_t> first_task(size_t(tt.n_tensors) + 1), first_slice(size_t(tt.n_tensors) + 1);
    std::vector<int64_t> row_base(size_t(tt.n_tensors)), col_base(size_t(tt.n_tensors));
    int64_t col_total = 0, n_slices = 0, n_rows = 0, n_cols = 0;
    for (int64_t t = 0; t < tt.n_tensors; ++t) {
      first_task[size_t(t)] = int64_t(tasks.size());
      first_slice[size_t(t)] = n_slices;
      const int64_t R = rows[t], C = cols[t], B = tt.numel[t] / (R * C);
      row_base[size_t(t)] = n_rows;
      col_base[size_t(t)] = n_cols;
      n_slices += B;
      n_rows += B * R;
      n_cols += B * C;
      const int64_t per_task = std::max<int64_t>(1, tt.chunk_size / C);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r0 = 0; r0 < R; r0 += per_task) {
          tasks.push_back({t, b, r0, std::min(per_task, R - r0), col_total});
          col_total += C;
        }
    }
    first_task[size_t(tt.n_tensors)] = int64_t(tasks.size());
    first_slice[size_t(tt.n_tensors)] = n_slices;
    const int64_t n_tasks = int64_t(tasks.size());
    // Sums over one row (at most a few thousand terms) are taken in the math
    // type, in SIMD lanes; rows, tasks and tensors are combined in double.
    FactoredScratch<T>& scratch = FactoredScratch<T>::of_this_thread();
    struct Trim {
      FactoredScratch<T>& s;
      ~Trim() { s.trim(); }
    } trim_on_return{scratch};
    std::vector<T>& col_partial = scratch.col_partial;
    std::vector<T>& col_h = scratch.col_h;
    std::vector<double>& p_partial = scratch.p_partial;
    std::vector<double>& u_partial = scratch.u_partial;
    // per task: the least row_var of its rows with g^2 > 0, and whether all its row_vars are finite;
    // per slice: whether its sum(u*u) came from the partials (then in u_partial of its first task)
    std::vector<T>& task_min_row = scratch.task_min_row;
    std::vector<unsigned char>& task_finite = scratch.task_finite;
    std::vector<unsigned char>& slice_done = scratch.slice_done;
    // per slice: the least of its col_vars that are not NaN (a row whose rowq times it is >= eps1^2
    // has no element clamped: the update takes it without the per-element test)
    std::vector<T>& slice_min_col = scratch.slice_min_col;
    // u = g * (v < eps1^2 ? 1 / eps1 : rrow * rcol), v = rowq * col, rowq = row / rmean,
    // rrow = rsqrt(rowq), rcol = rsqrt(col): torch's rsqrt(clamp(row * col / rmean, eps1^2)) * g
    // without a division or square root per element.
    std::vector<T>& rowq = scratch.rowq;
    std::vector<T>& rrow = scratch.rrow;
    std::vector<T>& rcol = scratch.rcol;
    std::vector<T>& colv = scratch.colv;
    col_partial.resize(size_t(col_total));  // each task zeroes its own, then adds to them
    col_h.resize(size_t(col_total));
    p_partial.resize(size_t(n_tasks));
    u_partial.resize(size_t(n_tasks));
    task_min_row.resize(size_t(n_tasks));
    task_finite.resize(size_t(n_tasks));
    slice_done.resize(size_t(n_slices));
    slice_min_col.resize(size_t(n_slices));
    rowq.resize(size_t(n_rows));
    rrow.resize(size_t(n_rows));
    rcol.resize(size_t(n_cols));
    colv.resize(size_t(n_cols));
    const T eps1 = T(h.eps1), eps1_sq = T(h.eps1 * h.eps1), inv_eps1 = T(1.0 / h.eps1);
    const T mult = (h.grad_mult ? T(*h.grad_mult) : T(1)) * (h.maximize ? T(-1) : T(1));

    // Waves of consecutive tensors, about kWaveBytes of g and p (a larger
    // tensor alone), go through every pass before the next wave starts, and
    // pass 1 and the update give each task to the same thread
    // (parallel_affine): the update then reads a wave's g and p again from
    // the caches of the core that read them in pass 1, not from memory.
    // gpt2-d256-L4's matrices in one launch (bench/native/adafactor_ab.cpp):
    // 0.90-0.99x the time of one wave of all, with memory usual; 0.78-0.82x
    // with memory fast (0.81-0.85x from the task affinity alone); waves of 4
    // or 16 MB within a few % of 8.
    constexpr int64_t kWaveBytes = int64_t(8) << 20;
    // g and the weights: p, its fp32 master, or p and its remainder
    const int64_t elem_bytes = int64_t(sizeof(P)) + (MASTER && !REM ? int64_t(sizeof(float)) : int64_t(sizeof(P))) +
                               (REM ? int64_t(sizeof(int16_t)) : 0);
    std::vector<double> scale(static_cast<size_t>(tt.n_tensors));
    const T m_weight = T(1.0 - h.beta1);
    for (int64_t t0 = 0, t1 = 0; t0 < tt.n_tensors; t0 = t1) {
      int64_t bytes = 0;
      for (t1 = t0; t1 < tt.n_tensors && (t1 == t0 || bytes + tt.numel[t1] * elem_bytes <= kWaveBytes); ++t1)
        bytes += tt.numel[t1] * elem_bytes;
      const int64_t k0 = first_task[size_t(t0)], k1 = first_task[size_t(t1)];
      const int64_t slice0 = first_slice[size_t(t0)], slice1 = first_slice[size_t(t1)];
      // pass 1: row sums (final: row_var updated), column partials, sum(p*p)
      parallel_affine(k0, k1, num_threads, [&](int64_t k) {
        const RowTask& task = tasks[size_t(k)];
        const int64_t t = task.tensor, C = cols[t], R = rows[t];
        const Weights<P, MASTER, REM, false> weights(tt, kAfParam, kAfMaster, t, 0, 0u);  // read only
        const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t);
        S* __restrict__ row_var = tt.ptr<S>(kAfRowVar, t) + task.batch * R;
        T* __restrict__ colp = col_partial.data() + task.col_offset;
        T* __restrict__ colh = col_h.data() + task.col_offset;
        std::fill(colp, colp + C, T(0));  // here, by the thread that adds to them
        std::fill(colh, colh + C, T(0));
        const T w = T(steps[size_t(t)].one_minus_beta2_t);
        double p_acc = 0.0;
        T min_row = std::numeric_limits<T>::infinity();
        bool finite = true;
        // A row's sums are final: update its row_var; its weight in the column
        // sums of g^2 / row_var is 1 / row_var if it is finite and from g^2 > 0
        // (and every row of the task before it is finite), else 0. (A row left
        // out with a non-finite g^2 makes its slice go to pass 3: its sums
        // from these are not used.)
        auto finish_row = [&](int64_t r, T row_acc, T row_p) -> T {
          p_acc += double(row_p);
          row_var[r] = Store<S>::from(lerp(T(to_math(row_var[r])), row_acc / T(C), w));
          const T rv = T(to_math(row_var[r]));  // as stored, as pass 2 reads it
          finite = finite && std::isfinite(rv);
          if (!(row_acc > T(0) && finite)) return T(0);
          min_row = rv < min_row ? rv : min_row;
          return T(1) / rv;
        };
        // The rows go as two halves side by side (rows r and r + half in one
        // loop): two sequential streams per array keep twice the loads in
        // flight. One stream of short rows left this pass latency-bound, far
        // below the bandwidth the update pass gets (gpt2-d256-L4, same-process
        // A/B: 0.75x the time when memory was slow, ~0.98x when fast; four
        // quarters, or four adjacent rows, were slower). Their column sums go
        // by blocks of at least two pairs, about kBlockBytes of g per half,
        // read again from L1 (bench/native/adafactor_ab.cpp; GPT-2's
        // embedding [50257, 256]: blocks of 2 pairs as fast as the per-row sums
        // with memory usual, 4 pairs 1-3% slower; [768, 768]: 2 pairs 7% faster
        // than 1).
        constexpr int64_t kBlockBytes = 2048, kMaxPairs = 16;
        const int64_t half = task.nrows / 2;
        const int64_t first = (task.batch * R + task.row0) * C;
        const int64_t block = std::clamp<int64_t>(kBlockBytes / (C * int64_t(sizeof(P))), 2, kMaxPairs);
        T wa[kMaxPairs], wb[kMaxPairs];
        for (int64_t i0 = 0; i0 < half; i0 += block) {
          const int64_t n = std::min(block, half - i0);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t i = i0 + j;
            const RowSquares<T> s2 = row_squares<2, T>(grad, weights, first + i * C, half * C, C, mult);
            wa[j] = finish_row(task.row0 + i, s2.g2[0], s2.p2[0]);
            wb[j] = finish_row(task.row0 + half + i, s2.g2[1], s2.p2[1]);
          }
          column_squares<2, T, P>(grad + first + i0 * C, half * C, n, C, mult, wa, wb, colp, colh);
        }
        if (task.nrows % 2) {
          const int64_t last = first + 2 * half * C;
          const RowSquares<T> s1 = row_squares<1, T>(grad, weights, last, 0, C, mult);
          wa[0] = finish_row(task.row0 + task.nrows - 1, s1.g2[0], s1.p2[0]);
          column_squares<1, T, P>(grad + last, 0, 1, C, mult, wa, nullptr, colp, colh);
        }
        p_partial[size_t(k)] = p_acc;
        task_min_row[size_t(k)] = min_row;
        task_finite[size_t(k)] = finite;
      });

      // pass 2, per batch slice: col_var from the partials in task order, the mean
      // of row_var, and the row and column factors of u
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
      for (int64_t i = slice0; i < slice1; ++i) {
        const int64_t t = std::upper_bound(first_slice.begin(), first_slice.end(), i) - first_slice.begin() - 1;
        const int64_t b = i - first_slice[size_t(t)], R = rows[t], C = cols[t];
        const T w = T(steps[size_t(t)].one_minus_beta2_t);
        S* col_var = tt.ptr<S>(kAfColVar, t) + b * C;
        T* cv = colv.data() + col_base[size_t(t)] + b * C;
        T* rc = rcol.data() + col_base[size_t(t)] + b * C;
        int64_t j0 = first_task[size_t(t)];  // the slice's tasks: consecutive
        while (tasks[size_t(j0)].batch != b) ++j0;
        int64_t j1 = j0;
        T min_row = std::numeric_limits<T>::infinity();
        bool finite = true;
        for (; j1 < first_task[size_t(t) + 1] && tasks[size_t(j1)].batch == b; ++j1) {
          min_row = task_min_row[size_t(j1)] < min_row ? task_min_row[size_t(j1)] : min_row;
          finite = finite && task_finite[size_t(j1)];
        }
        T min_col = std::numeric_limits<T>::infinity(), min_any_col = min_col;
        double h_sum = 0.0;
        // the tasks' partials, kColumnBlock columns at a time: each task's are read in a row (column by
        // column across the tasks, a cache line per value, this took 0.2 ms a step for the benchmark's
        // GPT-2 embedding, one slice on one thread)
        constexpr int64_t kColumnBlock = 64;
        for (int64_t c0 = 0; c0 < C; c0 += kColumnBlock) {
          const int64_t n = std::min(kColumnBlock, C - c0);
          double sums[kColumnBlock] = {}, hs[kColumnBlock] = {};
          for (int64_t k = j0; k < j1; ++k) {
            const T* cp = col_partial.data() + tasks[size_t(k)].col_offset + c0;
            const T* ch = col_h.data() + tasks[size_t(k)].col_offset + c0;
            for (int64_t j = 0; j < n; ++j) {
              sums[j] += double(cp[j]);
              hs[j] += double(ch[j]);
            }
          }
          for (int64_t j = 0; j < n; ++j) {
            const int64_t c = c0 + j;
            const double sum = sums[j];
            col_var[c] = Store<S>::from(lerp(T(to_math(col_var[c])), T(sum / double(R)), w));
            cv[c] = T(to_math(col_var[c]));
            rc[c] = T(1) / sqrt(cv[c]);
            finite = finite && std::isfinite(cv[c]);
            min_any_col = cv[c] < min_any_col ? cv[c] : min_any_col;
            if (sum > 0.0) {  // the column has g^2 > 0: then col_var > 0
              min_col = cv[c] < min_col ? cv[c] : min_col;
              h_sum += hs[j] / double(cv[c]);
            }
          }
        }
        const S* row_var = tt.ptr<const S>(kAfRowVar, t) + b * R;
        double sum = 0.0;
        for (int64_t r = 0; r < R; ++r) sum += double(to_math(row_var[r]));
        const T rmean = clamp_min(T(sum / double(R)), eps1);
        T* rq = rowq.data() + row_base[size_t(t)] + b * R;
        T* rr = rrow.data() + row_base[size_t(t)] + b * R;
        for (int64_t r = 0; r < R; ++r) {
          rq[r] = T(to_math(row_var[r])) / rmean;
          rr[r] = T(1) / sqrt(rq[r]);
        }
        // no element with g^2 > 0 is clamped: rq * col of each is >= this (rounding is monotone)
        const bool unclamped = !(min_row < std::numeric_limits<T>::infinity()) ||
                               !(min_col < std::numeric_limits<T>::infinity()) || (min_row / rmean) * min_col >= eps1_sq;
        slice_done[size_t(i)] = finite && unclamped;
        slice_min_col[size_t(i)] = min_any_col;
        if (slice_done[size_t(i)]) {
          for (int64_t k = j0; k < j1; ++k) u_partial[size_t(k)] = 0.0;
          u_partial[size_t(j0)] = double(rmean) * h_sum;
        }
      }

      // pass 3: sum(u*u) per task of the slices pass 2 could not do (no parallel region when there are none)
      const auto done0 = slice_done.begin() + slice0, done1 = slice_done.begin() + slice1;
      const bool any_left = std::find(done0, done1, 0) != done1;
      if (any_left) parallel_affine(k0, k1, num_threads, [&](int64_t k) {
        const RowTask& task = tasks[size_t(k)];
        const int64_t t = task.tensor, R = rows[t], C = cols[t];
        if (slice_done[size_t(first_slice[size_t(t)] + task.batch)]) return;
        const T* __restrict__ cv = colv.data() + col_base[size_t(t)] + task.batch * C;
        const T* __restrict__ rc = rcol.data() + col_base[size_t(t)] + task.batch * C;
        double u_acc = 0.0;
        for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
          const int64_t row = row_base[size_t(t)] + task.batch * R + r;
          const T rq = rowq[size_t(row)], rr = rrow[size_t(row)];
          const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + (task.batch * R + r) * C;
          u_acc += double(row_u_squares(grad, C, mult, rq, rr, cv, rc, eps1_sq, inv_eps1));
        }
        u_partial[size_t(k)] = u_acc;
      });

      for (int64_t t = t0; t < t1; ++t) {
        double p_sq = 0.0, u_sq = 0.0;
        for (int64_t k = first_task[size_t(t)]; k < first_task[size_t(t) + 1]; ++k) {
          p_sq += p_partial[size_t(k)];
          u_sq += u_partial[size_t(k)];
        }
        scale[size_t(t)] = tensor_scale(h, steps[size_t(t)], p_sq, u_sq, tt.numel[t]);
      }

      // pass 4: the update, u recomputed as in pass 3
      if constexpr (M8) {
        // by the launch's chunks: the FP8 blocks of exp_avg follow the flat offsets, not the rows
        // (the wave's chunks: a tensor's chunks are consecutive, in tensor order)
        const int64_t* chunk_tensor_end = tt.chunk_tensor + tt.n_chunks;
        const int64_t first_chunk = std::lower_bound(tt.chunk_tensor, chunk_tensor_end, t0) - tt.chunk_tensor;
        const int64_t end_chunk = std::lower_bound(tt.chunk_tensor, chunk_tensor_end, t1) - tt.chunk_tensor;
        parallel_chunks(tt, first_chunk, end_chunk, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
          const int64_t t = chunk.tensor, R = rows[t], C = cols[t];
          const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t);
          const T s = T(scale[size_t(t)]);  // -alpha / denom: the step is u * -s
          fp8_moment_chunk<T, P, MASTER, REM, SR>(
              tt, chunk, T(steps[size_t(t)].decay), h.sr.seed,
              [&](int64_t b0, int64_t n, float* m_out, const uint8_t* m_in, float m_scale) {
                for_row_segments(chunk.start + b0, n, C, [&](int64_t row, int64_t c0, int64_t len, int64_t o) {
                  const T rq = rowq[size_t(row_base[size_t(t)] + row)], rr = rrow[size_t(row_base[size_t(t)] + row)];
                  const T* __restrict__ cv = colv.data() + col_base[size_t(t)] + row / R * C + c0;
                  const T* __restrict__ rc = rcol.data() + col_base[size_t(t)] + row / R * C + c0;
                  const P* __restrict__ g = grad + row * C + c0;
#pragma omp simd
                  for (int64_t c = 0; c < len; ++c) {
                    const T u = factored_u(T(to_math(g[c])) * mult, rq, rr, cv[c], rc[c], eps1_sq, inv_eps1);
                    m_out[o + c] = float(lerp(T(q8_decode<false>(m_in[o + c], m_scale)), u * -s, m_weight));
                  }
                });
              });
        });
        continue;
      }
      parallel_affine(k0, k1, num_threads, [&](int64_t k) {
        const RowTask& task = tasks[size_t(k)];
        const int64_t t = task.tensor, R = rows[t], C = cols[t];
        const T* __restrict__ cv = colv.data() + col_base[size_t(t)] + task.batch * C;
        const T* __restrict__ rc = rcol.data() + col_base[size_t(t)] + task.batch * C;
        const T decay = T(steps[size_t(t)].decay), s = T(scale[size_t(t)]);
        const T min_col = slice_min_col[size_t(first_slice[size_t(t)] + task.batch)];
        // the slice's rows and elements
        const T* __restrict__ rq = rowq.data() + row_base[size_t(t)] + task.batch * R;
        const T* __restrict__ rr = rrow.data() + row_base[size_t(t)] + task.batch * R;
        const int64_t first = task.batch * R * C;
        const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + first;
        const Weights<P, MASTER, REM, SR> w(tt, kAfParam, kAfMaster, t, first, h.sr.seed);
        S* __restrict__ exp_avg = BETA1 ? tt.ptr<S>(kAfExpAvg, t) + first : nullptr;
        for (int64_t r = task.row0; r < task.row0 + task.nrows; ++r) {
          const int64_t o = r * C;
          const T row_q = rq[r], row_r = rr[r];
          prefetch_row<BETA1>(grad, w, exp_avg, o, C);
          // row_q * min_col >= eps1^2 (or NaN): no element of the row is clamped (rounding is monotone)
          if (!(row_q * min_col < eps1_sq)) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T u = factored_u_unclamped(T(to_math(grad[o + c])) * mult, row_r, rc[c]);
              apply_element<T, S, BETA1>(w, exp_avg, o + c, u, decay, s, m_weight);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T u = factored_u(T(to_math(grad[o + c])) * mult, row_q, row_r, cv[c], rc[c], eps1_sq, inv_eps1);
              apply_element<T, S, BETA1>(w, exp_avg, o + c, u, decay, s, m_weight);
            }
          }
        }
      });
    }
  }
};

// 0-d / 1-d tensors, pass 1 (advances the steps): variance updated (u is formed from the value as stored),
// sum(p*p) and sum(u*u) per tensor into p_sq and u_sq.
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct VectorStats {
  static void run(const TensorTable& tt, const AdafactorHyper& h, int num_threads, double* p_sq, double* u_sq) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = advance_steps(tt, h);
    std::vector<double> p_partial(static_cast<size_t>(tt.n_chunks)), u_partial(static_cast<size_t>(tt.n_chunks));
    const T eps1_sq = T(h.eps1 * h.eps1);
    const T mult = (h.grad_mult ? T(*h.grad_mult) : T(1)) * (h.maximize ? T(-1) : T(1));
    parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
      const int64_t t = chunk.tensor;
      const Weights<P, MASTER, REM, false> weights(tt, kAfParam, kAfMaster, t, chunk.start, 0u);  // read only
      const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
      S* __restrict__ variance = tt.ptr<S>(kAfVariance, t) + chunk.start;
      const T w = T(steps[size_t(t)].one_minus_beta2_t);
      double p_acc = 0.0, u_acc = 0.0;
#pragma omp simd reduction(+ : p_acc, u_acc)
      for (int64_t i = 0; i < chunk.len; ++i) {
        const T g = T(to_math(grad[i])) * mult;
        const S v = Store<S>::from(lerp(T(to_math(variance[i])), g * g, w));
        variance[i] = v;
        const T u = adafactor_u(g, T(to_math(v)), eps1_sq);
        const T p = weights.template load<T>(i);
        p_acc += double(p * p);
        u_acc += double(u * u);
      }
      p_partial[size_t(c)] = p_acc;
      u_partial[size_t(c)] = u_acc;
    });
    std::fill(p_sq, p_sq + tt.n_tensors, 0.0);
    std::fill(u_sq, u_sq + tt.n_tensors, 0.0);
    for (int64_t c = 0; c < tt.n_chunks; ++c) {  // a tensor's chunks are consecutive: chunk order
      p_sq[tt.chunk_tensor[c]] += p_partial[size_t(c)];
      u_sq[tt.chunk_tensor[c]] += u_partial[size_t(c)];
    }
  }
};

// 0-d / 1-d tensors, pass 2: the update, scaled by the sums of the whole tensors (p_sq, u_sq over numel
// elements each: of the launch's tensors, or summed over their shards).
template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct VectorUpdate {
  static void run(const TensorTable& tt, const AdafactorHyper& h, int num_threads, const double* p_sq,
                  const double* u_sq, const int64_t* numel) {
    using T = typename MathOf<P>::type;
    const std::vector<AdafactorStep> steps = step_scalars(tt, h);
    const T eps1_sq = T(h.eps1 * h.eps1);
    const T mult = (h.grad_mult ? T(*h.grad_mult) : T(1)) * (h.maximize ? T(-1) : T(1));
    std::vector<double> scale(static_cast<size_t>(tt.n_tensors));
    for (int64_t t = 0; t < tt.n_tensors; ++t)
      scale[size_t(t)] = tensor_scale(h, steps[size_t(t)], p_sq[t], u_sq[t], numel[t]);
    const T m_weight = T(1.0 - h.beta1);
    parallel_chunks(tt, num_threads, [&](int64_t /*c*/, const Chunk& chunk) {
      const int64_t t = chunk.tensor;
      const P* __restrict__ grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
      const S* __restrict__ variance = tt.ptr<const S>(kAfVariance, t) + chunk.start;
      const T decay = T(steps[size_t(t)].decay), s = T(scale[size_t(t)]);
      if constexpr (M8) {
        fp8_moment_chunk<T, P, MASTER, REM, SR>(
            tt, chunk, decay, h.sr.seed, [&](int64_t b0, int64_t n, float* m_out, const uint8_t* m_in, float m_scale) {
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) {
                const T u = adafactor_u(T(to_math(grad[b0 + i])) * mult, T(to_math(variance[b0 + i])), eps1_sq);
                m_out[i] = float(lerp(T(q8_decode<false>(m_in[i], m_scale)), u * -s, m_weight));
              }
            });
      } else {
        const Weights<P, MASTER, REM, SR> w(tt, kAfParam, kAfMaster, t, chunk.start, h.sr.seed);
        S* __restrict__ exp_avg = BETA1 ? tt.ptr<S>(kAfExpAvg, t) + chunk.start : nullptr;
#pragma omp simd
        for (int64_t i = 0; i < chunk.len; ++i) {
          const T u = adafactor_u(T(to_math(grad[i])) * mult, T(to_math(variance[i])), eps1_sq);
          apply_element<T, S, BETA1>(w, exp_avg, i, u, decay, s, m_weight);
        }
      }
    });
  }
};

template <typename P, typename S, bool MASTER, bool REM, bool BETA1, bool SR, bool M8>
struct Vector {
  static void run(const TensorTable& tt, const AdafactorHyper& h, int num_threads) {
    std::vector<double> p_sq(static_cast<size_t>(tt.n_tensors)), u_sq(static_cast<size_t>(tt.n_tensors));
    VectorStats<P, S, MASTER, REM, BETA1, SR, M8>::run(tt, h, num_threads, p_sq.data(), u_sq.data());
    VectorUpdate<P, S, MASTER, REM, BETA1, SR, M8>::run(tt, h, num_threads, p_sq.data(), u_sq.data(), tt.numel);
  }
};

// Pass<P, S, MASTER, REM, BETA1, SR, M8>::run(args...) for the launch's switches:
// remainders, beta1, stochastic rounding, and exp_avg as block-scaled FP8 (which needs beta1).
template <template <typename, typename, bool, bool, bool, bool, bool> class Pass>
struct Switches {
  template <typename P, typename S, bool MASTER>
  struct Op {
    template <bool REM, bool SR, typename... Args>
    static void run_sr(const AdafactorHyper& h, bool m8, Args&&... args) {
      if (m8) Pass<P, S, MASTER, REM, true, SR, true>::run(args...);
      else if (h.has_beta1) Pass<P, S, MASTER, REM, true, SR, false>::run(args...);
      else Pass<P, S, MASTER, REM, false, SR, false>::run(args...);
    }
    template <typename... Args>
    static void run(const AdafactorHyper& h, bool m8, Args&&... args) {
      if constexpr (kStochasticRoundable<P, MASTER>) {
        if (h.sr.on) return run_sr<false, true>(h, m8, args...);
      }
      with_remainder<P, MASTER>(h.remainder, [&](auto rem) { run_sr<decltype(rem)::value, false>(h, m8, args...); });
    }
  };
};

}  // namespace

void adafactor_factored_cpu(const TensorTable& tt, const int64_t* rows, const int64_t* cols,
                            const AdafactorHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                            bool fp8_exp_avg, int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step, steps too
  if (tt.n_tensors == 0) return;
  dispatch_storage<Switches<Factored>::Op>(param_dtype, state_dtype, has_master, h, fp8_exp_avg, tt, rows, cols, h,
                                           num_threads);
}

void adafactor_vector_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype, DType state_dtype,
                          bool has_master, bool fp8_exp_avg, int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;
  if (tt.n_tensors == 0) return;
  dispatch_storage<Switches<Vector>::Op>(param_dtype, state_dtype, has_master, h, fp8_exp_avg, tt, h, num_threads);
}

void adafactor_vector_stats_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype,
                                DType state_dtype, bool has_master, int num_threads, double* p_sq, double* u_sq) {
  std::fill(p_sq, p_sq + tt.n_tensors, 0.0);
  std::fill(u_sq, u_sq + tt.n_tensors, 0.0);
  if (h.found_inf && *h.found_inf != 0.0f) return;  // zeros for the collectives; nothing changes
  if (tt.n_tensors == 0) return;
  dispatch_storage<Switches<VectorStats>::Op>(param_dtype, state_dtype, has_master, h, false, tt, h, num_threads,
                                              p_sq, u_sq);
}

void adafactor_vector_update_cpu(const TensorTable& tt, const AdafactorHyper& h, DType param_dtype,
                                 DType state_dtype, bool has_master, bool fp8_exp_avg, int num_threads,
                                 const double* p_sq, const double* u_sq, const int64_t* numel) {
  if (h.found_inf && *h.found_inf != 0.0f) return;
  if (tt.n_tensors == 0) return;
  dispatch_storage<Switches<VectorUpdate>::Op>(param_dtype, state_dtype, has_master, h, fp8_exp_avg, tt, h,
                                               num_threads, p_sq, u_sq, numel);
}

}  // namespace fusedopt
