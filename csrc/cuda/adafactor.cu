// Adafactor on CUDA (include/fusedopt/adafactor.h): a sequence of launches per
// bucket on one stream, in the same passes as the Triton kernels
// (kernels/adafactor.py) and the same per-element math as the CPU loops
// (cpu/adafactor.cpp). lr (when a tensor), grad_mult, found_inf and each
// tensor's step are read on the device, so nothing waits on the host.
//
// Factored tensors ([.., R, C], contiguous; AdafactorLayout's tasks of at most
// kAfTaskRows rows of one batch slice):
//   row_stats       a block per task: row sums of g^2 (final: row_var updated),
//                   the task's column sums of g^2, its sum of p^2   (reads g, p)
//   col_stats       a block per kAfColBlock columns of a slice: col_var from
//                   the tasks' column sums in task order; the slice's first
//                   program also forms rmean = clamp(mean of row_var, eps1)
//   factored_unorm  a block per chunk: partial sums of u^2            (reads g)
//   apply           a block per chunk: the update           (reads g, p; writes p)
// 0-d and 1-d tensors (elementwise `variance`), by chunks:
//   vector_stats    variance updated, partial sums of p^2 and u^2
//   apply           the update
// Between them, per tensor: partials combined in a fixed order
// (combine_kernel) and scales_kernel forms the scale from alpha and denom. A block's sums use
// a fixed per-thread order and a fixed tree: deterministic, no float atomics.
// With exp_avg block-scaled FP8 the apply kernel encodes each 256-element
// block (fp8_states.cuh) and moves the params by the moments as stored.
//
// Local shards of DTensor params go in phases (adafactor_sharded_cuda), with
// the statistics summed over the shards between them by the Python side:
// row_stats and col_stats with RAW write the row and column sums of g^2
// instead of updating row_var and col_var; sharded_factors_kernel updates
// them from the whole rows' and columns' sums and sums row_var per slice;
// factored_unorm and apply as above, with rmean and the scales given.
// No torch headers.
#include <cuda_runtime.h>

#include <math.h>

#include "fp8_states.cuh"
#include "fusedopt/adafactor.h"
#include "fusedopt/dispatch.h"
#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using namespace cuda;  // the shared multi-tensor helpers (multi_tensor.cuh)

constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ bool skipped(const AdafactorHyper& h) { return h.found_inf && *h.found_inf != 0.0f; }

__device__ __forceinline__ double lr_of(const AdafactorHyper& h) { return h.lr_ptr ? double(*h.lr_ptr) : h.lr; }

// The tensor's per-step scalars from its step count (advanced before the launch).
__device__ __forceinline__ AdafactorStep step_of(const TensorTable& tt, const AdafactorHyper& h, int64_t t) {
  return adafactor_step(h, lr_of(h), double(*tt.ptr<const float>(kAfStep, t)));
}

// grad_mult and the sign of maximize in one factor (exact: 1 or a power of two times the clip coefficient).
template <typename T>
__device__ __forceinline__ T grad_factor(const AdafactorHyper& h) {
  return (h.grad_mult ? T(*h.grad_mult) : T(1)) * (h.maximize ? T(-1) : T(1));
}

// u of element e (flat, row-major) of a factored tensor: its row's and column's statistics.
template <typename T, typename S>
struct FactoredU {
  const S* row_var;      // the tensor's [B * R]
  const S* col_var;      // the tensor's [B * C]
  const double* rmean;   // the tensor's slices' [B]
  int64_t R, C;
  T eps1_sq, inv_eps1;

  __device__ __forceinline__ T operator()(T g, int64_t e) const {
    const int64_t row = e / C, c = e - row * C, b = row / R;
    const T rowq = T(to_math(row_var[row])) / T(rmean[b]);
    const T col = T(to_math(col_var[b * C + c]));
    return factored_u(g, rowq, T(1) / sqrt(rowq), col, T(1) / sqrt(col), eps1_sq, inv_eps1);
  }
};

template <typename T, typename S>
__device__ __forceinline__ FactoredU<T, S> factored_u_of(const TensorTable& tt, const AdafactorLayout& L,
                                                         const AdafactorHyper& h, const double* rmean, int64_t t) {
  return FactoredU<T, S>{tt.ptr<const S>(kAfRowVar, t), tt.ptr<const S>(kAfColVar, t), rmean + L.slice_first[t],
                         L.rows[t], L.cols[t], T(h.eps1 * h.eps1), T(1.0 / h.eps1)};
}

// --- factored statistics ---------------------------------------------------------------------

// A block per task: each thread walks columns c = threadIdx.x + k * kThreads of the task's rows,
// keeping one partial row sum per row (registers) and writing the column's sum; row sums are
// reduced per warp by shuffles, then over the warps in a fixed order.
// RAW: the row sums of g^2 (fp64) go to row_out[row_base[t] + b * R + r], row_var is left as it is.
template <typename P, typename S, bool MASTER, bool REM, bool RAW>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(TensorTable tt, AdafactorLayout L, AdafactorHyper h,
                                                             double* col_partial, double* p_partial, double* row_out,
                                                             const int64_t* row_base) {
  using T = typename MathOf<P>::type;
  __shared__ T warp_sums[kAfTaskRows][kWarps];
  if (skipped(h)) return;
  const int64_t k = blockIdx.x, slice = L.task_slice[k];
  const int64_t t = L.slice_tensor[slice], b = L.slice_batch[slice];
  const int64_t R = L.rows[t], C = L.cols[t], row0 = L.task_row0[k], nrows = L.task_rows[k];
  const int64_t base = (b * R + row0) * C;
  const P* grad = tt.ptr<const P>(kAfGrad, t) + base;
  const P* param = tt.ptr<const P>(kAfParam, t) + base;
  const float* master = MASTER && !REM ? tt.ptr<const float>(kAfMaster, t) + base : nullptr;
  const int16_t* rem = REM ? tt.ptr<const int16_t>(kAfMaster, t) + base : nullptr;  // (remainders: numeric.h)
  const T mult = grad_factor<T>(h);
  T row_acc[kAfTaskRows];
#pragma unroll
  for (int r = 0; r < kAfTaskRows; ++r) row_acc[r] = T(0);
  double p_acc = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    T col = T(0);
#pragma unroll
    for (int r = 0; r < kAfTaskRows; ++r) {
      if (r < nrows) {
        const T g = T(to_math(grad[r * C + c])) * mult;
        const T g2 = g * g;
        row_acc[r] += g2;
        col += g2;
        const T p = weight_at<T, MASTER, REM>(param, master, rem, r * C + c);
        p_acc += double(p * p);
      }
    }
    col_partial[L.task_col[k] + c] = double(col);
  }
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
#pragma unroll
  for (int r = 0; r < kAfTaskRows; ++r) {
    T v = row_acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) warp_sums[r][warp] = v;
  }
  __syncthreads();
  if (int64_t(threadIdx.x) < nrows) {
    T total = T(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[threadIdx.x][w];
    if (RAW) {
      row_out[row_base[t] + b * R + row0 + threadIdx.x] = double(total);
    } else {
      S* row_var = tt.ptr<S>(kAfRowVar, t) + b * R + row0 + threadIdx.x;
      const T weight = T(step_of(tt, h, t).one_minus_beta2_t);
      *row_var = Store<S>::from(lerp(T(to_math(*row_var)), total / T(C), weight));
    }
  }
  int nan = 0;
  const double p_total = block_reduce<double, false>(p_acc, nan);
  if (threadIdx.x == 0) p_partial[k] = p_total;
}

// A block per kAfColBlock columns of one slice: kThreads / kAfColBlock lanes per column sum every
// such lane's share of the slice's tasks, then the lanes are added in lane order. The slice's first
// program also forms rmean (row_var is final: row_stats ran before).
// RAW: the column sums of g^2 go to col_out[col_base[t] + b * C + c]; col_var and rmean are left.
template <typename P, typename S, bool RAW>
__global__ void __launch_bounds__(kThreads) col_stats_kernel(TensorTable tt, AdafactorLayout L, AdafactorHyper h,
                                                             const double* col_partial, double* rmean,
                                                             double* col_out, const int64_t* col_base) {
  using T = typename MathOf<P>::type;
  constexpr int kLanes = kThreads / kAfColBlock;
  __shared__ double lane_sums[kLanes][kAfColBlock];
  if (skipped(h)) return;
  const int64_t slice = L.colprog_slice[blockIdx.x], c0 = L.colprog_col0[blockIdx.x];
  const int64_t t = L.slice_tensor[slice], b = L.slice_batch[slice], R = L.rows[t], C = L.cols[t];
  const int x = int(threadIdx.x) % kAfColBlock, lane = int(threadIdx.x) / kAfColBlock;
  const int64_t c = c0 + x;
  double sum = 0.0;
  if (c < C) {
    for (int64_t k = L.slice_task_first[slice] + lane; k < L.slice_task_first[slice + 1]; k += kLanes)
      sum += col_partial[L.task_col[k] + c];
  }
  lane_sums[lane][x] = sum;
  __syncthreads();
  if (lane == 0 && c < C) {
    double total = 0.0;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) total += lane_sums[l][x];
    if (RAW) {
      col_out[col_base[t] + b * C + c] = total;
    } else {
      S* col_var = tt.ptr<S>(kAfColVar, t) + b * C + c;
      const T w = T(step_of(tt, h, t).one_minus_beta2_t);
      *col_var = Store<S>::from(lerp(T(to_math(*col_var)), T(total / double(R)), w));
    }
  }
  if (!RAW && c0 == 0) {  // the same for every thread of the block: the barriers in block_reduce are safe
    const S* row_var = tt.ptr<const S>(kAfRowVar, t) + b * R;
    double acc = 0.0;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) acc += double(to_math(row_var[r]));
    int nan = 0;
    const double total = block_reduce<double, false>(acc, nan);
    if (threadIdx.x == 0) rmean[slice] = double(clamp_min(T(total / double(R)), T(h.eps1)));
  }
}

// Sharded phases: a block per slice. row_var and col_var lerped to the whole rows' and columns' means
// (sums over full_cols[t] and full_rows[t] elements); the slice's sum of row_var as stored.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) sharded_factors_kernel(TensorTable tt, AdafactorLayout L,
                                                                   AdafactorHyper h,
                                                                   AdafactorShardedScratch sh) {
  using T = typename MathOf<P>::type;
  if (skipped(h)) return;  // (rv_sums stays zero: the Python side zeroes it)
  const int64_t slice = blockIdx.x, t = L.slice_tensor[slice], b = L.slice_batch[slice];
  const int64_t R = L.rows[t], C = L.cols[t];
  const T w = T(step_of(tt, h, t).one_minus_beta2_t);
  S* row_var = tt.ptr<S>(kAfRowVar, t) + b * R;
  S* col_var = tt.ptr<S>(kAfColVar, t) + b * C;
  const double* rows = sh.row_sums + sh.row_base[t] + b * R;
  const double* cols = sh.col_sums + sh.col_base[t] + b * C;
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < R; r += kThreads) {
    row_var[r] = Store<S>::from(lerp(T(to_math(row_var[r])), T(rows[r] / double(sh.full_cols[t])), w));
    acc += double(to_math(row_var[r]));
  }
  for (int64_t c = threadIdx.x; c < C; c += kThreads)
    col_var[c] = Store<S>::from(lerp(T(to_math(col_var[c])), T(cols[c] / double(sh.full_rows[t])), w));
  int nan = 0;
  const double total = block_reduce<double, false>(acc, nan);
  if (threadIdx.x == 0) sh.rv_sums[slice] = total;
}

// A block per chunk of a factored tensor: its partial sum of u^2.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) factored_unorm_kernel(TensorTable tt, AdafactorLayout L,
                                                                  AdafactorHyper h, const double* rmean,
                                                                  double* u_partial) {
  using T = typename MathOf<P>::type;
  if (skipped(h)) return;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  const P* grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
  const bool aligned = cuda::is_aligned(grad);
  const FactoredU<T, S> u_at = factored_u_of<T, S>(tt, L, h, rmean, t);
  const T mult = grad_factor<T>(h);
  double u_acc = 0.0;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k < chunk.len) {
        const T u = u_at(T(to_math(g_in[k])) * mult, chunk.start + i + k);
        u_acc += double(u * u);
      }
    }
  }
  int nan = 0;
  const double total = block_reduce<double, false>(u_acc, nan);
  if (threadIdx.x == 0) u_partial[blockIdx.x] = total;
}

// --- 0-d and 1-d tensors ----------------------------------------------------------------------

// A block per chunk: variance updated (u from the value as stored), partial sums of p^2 and u^2.
template <typename P, typename S, bool MASTER, bool REM>
__global__ void __launch_bounds__(kThreads) vector_stats_kernel(TensorTable tt, AdafactorHyper h,
                                                                double* p_partial, double* u_partial) {
  using T = typename MathOf<P>::type;
  if (skipped(h)) return;
  const Chunk chunk = tt.chunk(blockIdx.x);
  const int64_t t = chunk.tensor;
  WeightPack<P, MASTER, REM> w(tt, kAfParam, kAfMaster, t, chunk.start);  // read only
  const P* grad = tt.ptr<const P>(kAfGrad, t) + chunk.start;
  S* variance = tt.ptr<S>(kAfVariance, t) + chunk.start;
  const bool aligned = w.aligned() && cuda::is_aligned(grad) && cuda::is_aligned(variance);
  const T lerp_w = T(step_of(tt, h, t).one_minus_beta2_t), eps1_sq = T(h.eps1 * h.eps1), mult = grad_factor<T>(h);
  double p_acc = 0.0, u_acc = 0.0;
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < chunk.len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S v_io[kILP];
    w.load(i, chunk.len, aligned);
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    cuda::load_pack(v_io, variance, i, chunk.len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {  // past the end: zeros in, nothing stored, nothing added
      const T g = T(to_math(g_in[k])) * mult;
      v_io[k] = Store<S>::from(lerp(T(to_math(v_io[k])), g * g, lerp_w));
      const T u = adafactor_u(g, T(to_math(v_io[k])), eps1_sq);
      const T p = w.template get<T>(k);
      if (i + k < chunk.len) {
        p_acc += double(p * p);
        u_acc += double(u * u);
      }
    }
    cuda::store_pack(variance, v_io, i, chunk.len, aligned);
  }
  int nan = 0;
  const double p_total = block_reduce<double, false>(p_acc, nan);
  __syncthreads();  // every thread has read the first result before the second reduction reuses the buffer
  const double u_total = block_reduce<double, false>(u_acc, nan);
  if (threadIdx.x == 0) {
    p_partial[blockIdx.x] = p_total;
    u_partial[blockIdx.x] = u_total;
  }
}

// --- the update -------------------------------------------------------------------------------

// One thread per tensor: scale = -alpha / denom from the sums.
__global__ void scales_kernel(TensorTable tt, AdafactorHyper h, double* sums) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = tt.n_tensors;
  if (skipped(h) || t >= n) return;
  double alpha, denom;
  adafactor_scale(h, step_of(tt, h, t), sums[t], sums[n + t], double(tt.numel[t]), &alpha, &denom);
  sums[2 * n + t] = -alpha / denom;
}

// The per-chunk constants of the update.
template <typename T>
struct ApplyScalars {
  T decay, scale, m_weight, eps1_sq, mult;
};

template <typename T>
__device__ __forceinline__ ApplyScalars<T> apply_scalars(const TensorTable& tt, const AdafactorHyper& h,
                                                         const double* sums, int64_t t) {
  const int64_t n = tt.n_tensors;
  return {T(step_of(tt, h, t).decay), T(sums[2 * n + t]), T(1.0 - h.beta1),
          T(h.eps1 * h.eps1), grad_factor<T>(h)};
}

// What both update kernels do around the first moment, for one chunk: load g
// and the variance, form u, and move the weights (a WeightPack: p, its master,
// or p and its remainder) to p * decay + scale * u, or p * decay - m (the
// first moment as stored).
template <typename P, typename S, bool FACTORED, bool SR>
struct UpdateChunk {
  using T = typename MathOf<P>::type;
  Chunk chunk;
  ApplyScalars<T> s;
  uint32_t sr_key;
  const P* grad;
  const S* variance;
  FactoredU<T, S> u_at;

  __device__ UpdateChunk(const TensorTable& tt, const AdafactorLayout& L, const AdafactorHyper& h,
                         const double* rmean, const double* sums)
      : chunk(tt.chunk(blockIdx.x)), s(apply_scalars<T>(tt, h, sums, chunk.tensor)),
        sr_key(SR ? sr_tensor_key(h.sr.seed, chunk.tensor) : 0u),
        grad(tt.ptr<const P>(kAfGrad, chunk.tensor) + chunk.start),
        variance(FACTORED ? nullptr : tt.ptr<const S>(kAfVariance, chunk.tensor) + chunk.start), u_at{} {
    if (FACTORED) u_at = factored_u_of<T, S>(tt, L, h, rmean, chunk.tensor);
  }

  __device__ bool aligned() const { return cuda::is_aligned(grad) && (FACTORED || cuda::is_aligned(variance)); }

  __device__ void load(int64_t i, bool aligned, P (&g_in)[kILP], S (&v_in)[kILP]) const {
    cuda::load_pack(g_in, grad, i, chunk.len, aligned);
    if (!FACTORED) cuda::load_pack(v_in, variance, i, chunk.len, aligned);
  }

  // u of element i + k of the chunk.
  __device__ T u(int64_t i, int k, const P (&g_in)[kILP], const S (&v_in)[kILP]) const {
    const T g = T(to_math(g_in[k])) * s.mult;
    return FACTORED ? u_at(g, chunk.start + i + k) : adafactor_u(g, T(to_math(v_in[k])), s.eps1_sq);
  }

  // x: u (p += scale * u), or the first moment (p -= m)
  template <typename W>
  __device__ void update(int64_t i, int k, T x, W& w, bool moment) const {
    const T p = adafactor_apply(w.template get<T>(k), x, s.decay, moment ? T(-1) : s.scale);
    w.template set<SR>(k, p, sr_key, chunk.start + i + k);
  }
};

// A block per chunk: u (factored, or from the stored variance), then p = p * decay + scale * u, or
// with BETA1 m = lerp(m, u * -scale, 1 - beta1), p = p * decay - m. Lanes past the chunk's end
// compute nothing and store nothing.
template <typename P, typename S, bool MASTER, bool REM, bool FACTORED, bool BETA1, bool SR>
__global__ void __launch_bounds__(kThreads) apply_kernel(TensorTable tt, AdafactorLayout L, AdafactorHyper h,
                                                         const double* rmean, const double* sums) {
  using T = typename MathOf<P>::type;
  if (skipped(h)) return;
  const UpdateChunk<P, S, FACTORED, SR> c(tt, L, h, rmean, sums);
  const int64_t len = c.chunk.len;
  WeightPack<P, MASTER, REM> w(tt, kAfParam, kAfMaster, c.chunk.tensor, c.chunk.start);
  S* exp_avg = BETA1 ? tt.ptr<S>(kAfExpAvg, c.chunk.tensor) + c.chunk.start : nullptr;
  const bool aligned = c.aligned() && w.aligned() && (!BETA1 || cuda::is_aligned(exp_avg));
  for (int64_t i = int64_t(threadIdx.x) * kILP; i < len; i += int64_t(kThreads) * kILP) {
    P g_in[kILP];
    S v_in[kILP], m_io[kILP];
    w.load(i, len, aligned);
    c.load(i, aligned, g_in, v_in);
    if (BETA1) cuda::load_pack(m_io, exp_avg, i, len, aligned);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k >= len) continue;
      const T u = c.u(i, k, g_in, v_in);
      T x = u;
      if (BETA1) {
        m_io[k] = Store<S>::from(lerp(T(to_math(m_io[k])), u * -c.s.scale, c.s.m_weight));
        x = T(to_math(m_io[k]));
      }
      c.update(i, k, x, w, BETA1);
    }
    w.store(i, len, aligned);
    if (BETA1) cuda::store_pack(exp_avg, m_io, i, len, aligned);
  }
}

// The same with exp_avg block-scaled FP8 (fp8_states.cuh): each iteration's new moments are
// encoded with their blocks' new scales, and the params move by the moments as stored. Every
// thread runs every iteration (q8_store_group has barriers); chunks are multiples of kQBlock.
template <typename P, typename S, bool MASTER, bool REM, bool FACTORED, bool SR>
__global__ void __launch_bounds__(kThreads) apply_fp8_kernel(TensorTable tt, AdafactorLayout L, AdafactorHyper h,
                                                             const double* rmean, const double* sums) {
  using T = typename MathOf<P>::type;
  __shared__ uint32_t scratch[kThreads / 32];
  if (skipped(h)) return;
  const UpdateChunk<P, S, FACTORED, SR> c(tt, L, h, rmean, sums);
  const int64_t len = c.chunk.len;
  WeightPack<P, MASTER, REM> w(tt, kAfParam, kAfMaster, c.chunk.tensor, c.chunk.start);
  uint8_t* exp_avg = tt.ptr<uint8_t>(kAfExpAvg, c.chunk.tensor) + c.chunk.start;
  float* m_scales = tt.ptr<float>(kAfExpAvgScale, c.chunk.tensor) + c.chunk.start / kQBlock;
  const bool aligned = c.aligned() && w.aligned() && cuda::is_aligned(exp_avg);
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kILP) {
    const int64_t i = base + int64_t(threadIdx.x) * kILP;
    P g_in[kILP];
    S v_in[kILP];
    uint8_t m_in[kILP];
    float m_new[kILP], m_stored[kILP];
    w.load(i, len, aligned);
    c.load(i, aligned, g_in, v_in);
    cuda::load_pack(m_in, exp_avg, i, len, aligned);
    const float m_scale = i < len ? m_scales[i / kQBlock] : 0.0f;  // read before the block's new scale
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      m_new[k] = 0.0f;
      if (i + k >= len) continue;
      m_new[k] = float(lerp(T(q8_decode<false>(m_in[k], m_scale)), c.u(i, k, g_in, v_in) * -c.s.scale, c.s.m_weight));
    }
    cuda::q8_store_group(exp_avg, m_scales, i, len, aligned, m_new, scratch, m_stored);
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      if (i + k < len) c.update(i, k, T(m_stored[k]), w, true);
    }
    w.store(i, len, aligned);
  }
}

// --- launch ------------------------------------------------------------------------------------

struct Launch {
  const TensorTable& tt;
  const AdafactorLayout* layout;  // null: 0-d / 1-d tensors
  const int64_t* chunk_first;
  const AdafactorHyper& h;
  bool fp8_exp_avg;
  const AdafactorScratch& scratch;
  cudaStream_t stream;
};

template <typename P, typename S, bool MASTER, bool REM, bool FACTORED, bool SR>
void launch_apply(const Launch& a, const AdafactorLayout& L) {
  const dim3 grid(unsigned(a.tt.n_chunks));
  const double* rmean = a.scratch.rmean;
  const double* sums = a.scratch.sums;
  if (a.fp8_exp_avg) {
    apply_fp8_kernel<P, S, MASTER, REM, FACTORED, SR><<<grid, kThreads, 0, a.stream>>>(a.tt, L, a.h, rmean, sums);
  } else if (a.h.has_beta1) {
    apply_kernel<P, S, MASTER, REM, FACTORED, true, SR><<<grid, kThreads, 0, a.stream>>>(a.tt, L, a.h, rmean, sums);
  } else {
    apply_kernel<P, S, MASTER, REM, FACTORED, false, SR><<<grid, kThreads, 0, a.stream>>>(a.tt, L, a.h, rmean, sums);
  }
}

template <typename P, typename S, bool MASTER, bool REM>
struct StepOp {
  template <bool FACTORED>
  static void apply(const Launch& a, const AdafactorLayout& L) {
    if constexpr (kStochasticRoundable<P, MASTER>) {
      if (a.h.sr.on) return launch_apply<P, S, MASTER, REM, FACTORED, true>(a, L);
    }
    launch_apply<P, S, MASTER, REM, FACTORED, false>(a, L);
  }

  static void run(const Launch& a) {
    const TensorTable& tt = a.tt;
    const AdafactorScratch& sc = a.scratch;
    const int64_t n = tt.n_tensors;
    const dim3 per_tensor{unsigned(n)}, per_chunk{unsigned(tt.n_chunks)};
    if (a.layout != nullptr) {
      const AdafactorLayout& L = *a.layout;
      row_stats_kernel<P, S, MASTER, REM, false><<<dim3(unsigned(L.n_tasks)), kThreads, 0, a.stream>>>(
          tt, L, a.h, sc.col_partial, sc.p_partial, nullptr, nullptr);
      col_stats_kernel<P, S, false><<<dim3(unsigned(L.n_col_programs)), kThreads, 0, a.stream>>>(
          tt, L, a.h, sc.col_partial, sc.rmean, nullptr, nullptr);
      factored_unorm_kernel<P, S><<<per_chunk, kThreads, 0, a.stream>>>(tt, L, a.h, sc.rmean, sc.u_partial);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.p_partial, L.task_first, sc.sums);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.u_partial, a.chunk_first, sc.sums + n);
      scales_kernel<<<dim3(unsigned((n + kThreads - 1) / kThreads)), kThreads, 0, a.stream>>>(tt, a.h, sc.sums);
      apply<true>(a, L);
    } else {
      vector_stats_kernel<P, S, MASTER, REM><<<per_chunk, kThreads, 0, a.stream>>>(tt, a.h, sc.p_partial,
                                                                                    sc.u_partial);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.p_partial, a.chunk_first, sc.sums);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.u_partial, a.chunk_first, sc.sums + n);
      scales_kernel<<<dim3(unsigned((n + kThreads - 1) / kThreads)), kThreads, 0, a.stream>>>(tt, a.h, sc.sums);
      apply<false>(a, AdafactorLayout{});
    }
  }
};

// The phases of DTensor params' local shards (adafactor_sharded_cuda).
template <typename P, typename S, bool MASTER, bool REM>
struct ShardedOp {
  static void run(const Launch& a, int phase, const AdafactorShardedScratch& sh) {
    const TensorTable& tt = a.tt;
    const AdafactorScratch& sc = a.scratch;
    const int64_t n = tt.n_tensors;
    const dim3 per_tensor{unsigned(n)}, per_chunk{unsigned(tt.n_chunks)};
    if (phase == 3) {
      if (a.layout != nullptr) StepOp<P, S, MASTER, REM>::template apply<true>(a, *a.layout);
      else StepOp<P, S, MASTER, REM>::template apply<false>(a, AdafactorLayout{});
      return;
    }
    if (a.layout == nullptr) {  // phase 0: variance updated, sum(p^2) and sum(u^2) per tensor
      vector_stats_kernel<P, S, MASTER, REM><<<per_chunk, kThreads, 0, a.stream>>>(tt, a.h, sc.p_partial,
                                                                                    sc.u_partial);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.p_partial, a.chunk_first, sc.sums);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.u_partial, a.chunk_first, sc.sums + n);
      return;
    }
    const AdafactorLayout& L = *a.layout;
    if (phase == 0) {  // the rows' and columns' sums of g^2, sum(p^2) per tensor
      row_stats_kernel<P, S, MASTER, REM, true><<<dim3(unsigned(L.n_tasks)), kThreads, 0, a.stream>>>(
          tt, L, a.h, sc.col_partial, sc.p_partial, sh.row_sums, sh.row_base);
      col_stats_kernel<P, S, true><<<dim3(unsigned(L.n_col_programs)), kThreads, 0, a.stream>>>(
          tt, L, a.h, sc.col_partial, nullptr, sh.col_sums, sh.col_base);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.p_partial, L.task_first, sc.sums);
    } else if (phase == 1) {  // row_var, col_var; per slice the sum of row_var
      sharded_factors_kernel<P, S><<<dim3(unsigned(L.n_slices)), kThreads, 0, a.stream>>>(tt, L, a.h, sh);
    } else {  // phase 2: sum(u^2) per tensor, with the given rmean
      factored_unorm_kernel<P, S><<<per_chunk, kThreads, 0, a.stream>>>(tt, L, a.h, sc.rmean, sc.u_partial);
      combine_kernel<false><<<per_tensor, kThreads, 0, a.stream>>>(sc.u_partial, a.chunk_first, sc.sums + n);
    }
  }
};

// Op<P, S, MASTER, REM> for dispatch_storage's Op<P, S, MASTER>: REM when the launch's masters are remainders.
template <template <typename, typename, bool, bool> class Op>
struct WithRemainder {
  template <typename P, typename S, bool MASTER>
  struct Of {
    template <typename... Args>
    static void run(const Launch& a, Args&&... args) {
      with_remainder<P, MASTER>(a.h.remainder,
                                [&](auto rem) { Op<P, S, MASTER, decltype(rem)::value>::run(a, args...); });
    }
  };
};

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* adafactor_cuda(const TensorTable& tt, const AdafactorLayout* layout, const int64_t* chunk_first,
                           const AdafactorHyper& h, DType param_dtype, DType state_dtype, bool has_master,
                           bool fp8_exp_avg, const AdafactorScratch& scratch, void* stream) {
  if (tt.n_chunks == 0) return nullptr;
  const Launch launch{tt, layout, chunk_first, h, fp8_exp_avg, scratch, static_cast<cudaStream_t>(stream)};
  dispatch_storage<WithRemainder<StepOp>::Of>(param_dtype, state_dtype, has_master, launch);
  return last_error();
}

const char* adafactor_sharded_cuda(int phase, const TensorTable& tt, const AdafactorLayout* layout,
                                   const int64_t* chunk_first, const AdafactorHyper& h, DType param_dtype,
                                   DType state_dtype, bool has_master, const AdafactorScratch& scratch,
                                   const AdafactorShardedScratch& sharded, void* stream) {
  if (tt.n_chunks == 0) return nullptr;
  const Launch launch{tt, layout, chunk_first, h, false, scratch, static_cast<cudaStream_t>(stream)};
  dispatch_storage<WithRemainder<ShardedOp>::Of>(param_dtype, state_dtype, has_master, launch, phase, sharded);
  return last_error();
}

}  // namespace fusedopt
