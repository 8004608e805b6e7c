// Where does the CPU Adafactor step (csrc/cpu/adafactor.cpp) lose time
// against the bytes it moves, and would another pass 1 be faster? (README,
// "Benchmarks": FusedAdafactor against torch's fused AdamW.) The CPU
// benchmark's GPT-2 case is dominated by its embedding, [50257, 256] fp32:
// 103 MB of g and p, over the 32 MB L3. Loops over those arrays, timed
// round-robin so that a change of the machine's memory state hits them all;
// tasks of 256 whole rows as the library cuts them (chunk_size 65536 / C),
// two threads:
//
//   read          sum(g*g) and sum(p*p): the bound of pass 1 (8 B/param, reads only)
//   rows          the library's pass 1 until 7232f71: row pairs (rows i and
//                 half + i side by side) with row sums of g^2 and p^2 and column
//                 sums of g^2, then per row the column sums of g^2 / row_var from
//                 the row in L1 (the library now forms the column sums per block
//                 of two pairs, in registers: "lib"; bench/native/adafactor_ab.cpp
//                 times it against the form before)
//   rows -colh    the same without the g^2 / row_var loop: its cost
//   task cols     an alternative: the row sums, then the task's column sums
//                 of g^2 and g^2 / row_var, 64 columns at a time in registers
//                 (static schedule)
//   task cols +pf the same, prefetching the start of the next task meanwhile
//   update        p = p * decay + scale * g * rrow * rcol: the update pass's bytes (12 B/param)
//   clock         a latency-bound scalar chain: the cores' speed
//   lib           the library's whole step (csrc/cpu/adafactor.cpp, included), fp32 defaults
//   adamw         the fp32 AdamW step of include/fusedopt/adamw.h on as many elements (28 B/param)
//
// Measured 2026-11-30 (2 cores of an AMD EPYC, ms): with the memory in its
// usual state (in-place stream ~54 GB/s) read 3.1, rows 3.3, task cols 3.4
// (+pf no faster), update 2.9, adamw 6.5: pass 1 is bound by reads. In the
// state where the stream reaches 80-95 GB/s: read 2.0-2.3, rows 4.1,
// rows -colh 2.4, task cols 2.3-2.8, adamw 4.5, clock unchanged: there the
// per-row loads and stores of the column sums cost more than the memory
// traffic. The library keeps "rows": in the library, "task cols" made the
// whole step 3-7% slower in the usual state (same-run A/B, 50 rounds) for
// ~25% off pass 1 in the other. "lib" ran 0.4 ms a step in its setup before
// its scratch arrays were kept from step to step (FactoredScratch), 0.1 after.
// With the column sums per block of rows (7232f71), "lib" took 7.6-8.1 ms with
// the stream at 66-82 GB/s (8.4-9.2 ms at 83-87 GB/s before); the same-process
// A/B of adafactor_ab.cpp is the better measure: 0.83-0.87x when fast.
//
// Build (the cpu backend's flags: fusedopt/_jit.py) and run from the repository root:
//   g++ -O3 -march=native -mprefer-vector-width=512 -fno-math-errno -fno-trapping-math
//       -ffp-contract=off -fopenmp -std=c++17 -Icsrc/include bench/native/adafactor_pass1.cpp
//       -o /tmp/adafactor_pass1 && /tmp/adafactor_pass1 4
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "../../csrc/cpu/adafactor.cpp"  // the library's Adafactor, torch-free
#include "fusedopt/adamw.h"
#include "fusedopt/host_table.h"

using namespace fusedopt;

namespace {

constexpr int64_t R = 50257, C = 256, kN = R * C, kTaskRows = 65536 / C;
constexpr int64_t kTasks = (R + kTaskRows - 1) / kTaskRows;

double g_sink = 0.0;  // results go here so no loop is optimised away

// Sums of g^2 and p^2 over two rows side by side (at `base` and `base + gap`),
// with COLP the rows' g^2 added to the column sums colp.
struct PairSums {
  float a0, a1, q0, q1;
};
template <bool COLP>
inline PairSums pair_sums(const float* g, const float* p, int64_t base, int64_t gap, float* __restrict__ colp) {
  const float* __restrict__ g0 = g + base;
  const float* __restrict__ g1 = g + base + gap;
  const float* __restrict__ p0 = p + base;
  const float* __restrict__ p1 = p + base + gap;
  float a0 = 0.0f, a1 = 0.0f, q0 = 0.0f, q1 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, q0, q1)
  for (int64_t c = 0; c < C; ++c) {
    const float s0 = g0[c] * g0[c], s1 = g1[c] * g1[c];
    a0 += s0;
    a1 += s1;
    q0 += p0[c] * p0[c];
    q1 += p1[c] * p1[c];
    if (COLP) colp[c] += s0 + s1;
  }
  return {a0, a1, q0, q1};
}

__attribute__((noinline)) void read_bound(const float* __restrict__ g, const float* __restrict__ p) {
  double total = 0.0;
#pragma omp parallel for num_threads(2) schedule(dynamic, 1) reduction(+ : total)
  for (int64_t k = 0; k < kTasks; ++k) {
    const int64_t b = k * kTaskRows * C, e = std::min(kN, b + kTaskRows * C);
    float a = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : a, q)
    for (int64_t i = b; i < e; ++i) {
      a += g[i] * g[i];
      q += p[i] * p[i];
    }
    total += double(a) + double(q);
  }
  g_sink += total;
}

// COLH: the g^2 / row_var loop.
template <bool COLH>
__attribute__((noinline)) void rows_pass(const float* __restrict__ g, const float* __restrict__ p,
                                     float* __restrict__ row_var, float* __restrict__ col_partial,
                                     float* __restrict__ col_h) {
  double total = 0.0;
#pragma omp parallel for num_threads(2) schedule(dynamic, 1) reduction(+ : total)
  for (int64_t k = 0; k < kTasks; ++k) {
    const int64_t row0 = k * kTaskRows, nrows = std::min(kTaskRows, R - row0);
    float* __restrict__ colp = col_partial + k * C;
    float* __restrict__ colh = col_h + k * C;
    std::fill(colp, colp + C, 0.0f);
    std::fill(colh, colh + C, 0.0f);
    double p_acc = 0.0;
    auto finish_row = [&](int64_t r, float row_acc, float row_p) {
      p_acc += double(row_p);
      row_var[r] = row_var[r] + (row_acc / float(C) - row_var[r]) * 0.2f;
      if (!COLH || !(row_acc > 0.0f)) return;
      const float inv_rv = 1.0f / row_var[r];
      const float* __restrict__ gr = g + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) colh[c] += gr[c] * gr[c] * inv_rv;
    };
    const int64_t half = nrows / 2, gap = half * C;
    for (int64_t i = 0; i < half; ++i) {
      const PairSums ps = pair_sums<true>(g, p, (row0 + i) * C, gap, colp);
      finish_row(row0 + i, ps.a0, ps.q0);
      finish_row(row0 + half + i, ps.a1, ps.q1);
    }
    if (nrows % 2) {
      const int64_t r = row0 + nrows - 1;
      float a = 0.0f, q = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        a += g[r * C + c] * g[r * C + c];
        q += p[r * C + c] * p[r * C + c];
        colp[c] += g[r * C + c] * g[r * C + c];
      }
      finish_row(r, a, q);
    }
    total += p_acc;
  }
  g_sink += total;
}

// The task's column sums after its rows, CB columns at a time with the sums
// in registers (the task's g is in L2 by then).
template <int64_t CB>
inline void column_block(const float* __restrict__ g, const float* __restrict__ inv, int64_t half, int64_t C,
                         float* __restrict__ colp, float* __restrict__ colh) {
  float sp[CB] = {}, sh[CB] = {};
  for (int64_t i = 0; i < half; ++i) {
    const float* __restrict__ ga = g + i * C;
    const float* __restrict__ gb = g + (half + i) * C;
    const float ia = inv[i], ib = inv[half + i];
#pragma omp simd
    for (int64_t c = 0; c < CB; ++c) {
      const float sa = ga[c] * ga[c], sb = gb[c] * gb[c];
      sp[c] += sa + sb;
      sh[c] += sa * ia;
      sh[c] += sb * ib;
    }
  }
  for (int64_t c = 0; c < CB; ++c) {
    colp[c] = sp[c];
    colh[c] = sh[c];
  }
}

// PF: prefetch the start of the next task meanwhile.
template <int64_t CB, bool PF>
__attribute__((noinline)) void task_cols_pass(const float* __restrict__ g, const float* __restrict__ p,
                                             float* __restrict__ row_var, float* __restrict__ col_partial,
                                             float* __restrict__ col_h) {
  double total = 0.0;
#pragma omp parallel for num_threads(2) schedule(static) reduction(+ : total)
  for (int64_t k = 0; k < kTasks; ++k) {
    const int64_t row0 = k * kTaskRows, nrows = std::min(kTaskRows, R - row0);
    float inv[kTaskRows];
    double p_acc = 0.0;
    const int64_t half = nrows / 2, gap = half * C;
    for (int64_t i = 0; i < half; ++i) {
      const PairSums ps = pair_sums<false>(g, p, (row0 + i) * C, gap, nullptr);
      p_acc += double(ps.q0) + double(ps.q1);
      const int64_t r0 = row0 + i, r1 = row0 + half + i;
      row_var[r0] = row_var[r0] + (ps.a0 / float(C) - row_var[r0]) * 0.2f;
      row_var[r1] = row_var[r1] + (ps.a1 / float(C) - row_var[r1]) * 0.2f;
      inv[i] = 1.0f / row_var[r0];
      inv[half + i] = 1.0f / row_var[r1];
    }
    if (PF && k + 1 < kTasks) {
      // the start of the next task (static schedule: this thread's), both halves, g and p
      const int64_t nrow0 = row0 + kTaskRows, nhalf = std::min(kTaskRows, R - nrow0) / 2;
      for (int64_t l = 0; l < 8 * C; l += 16) {
        __builtin_prefetch(g + nrow0 * C + l);
        __builtin_prefetch(p + nrow0 * C + l);
        __builtin_prefetch(g + (nrow0 + nhalf) * C + l);
        __builtin_prefetch(p + (nrow0 + nhalf) * C + l);
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += CB)
      column_block<CB>(g + row0 * C + c0, inv, half, C, col_partial + k * C + c0, col_h + k * C + c0);
    total += p_acc;
  }
  g_sink += total;
}

__attribute__((noinline)) void update(const float* __restrict__ g, float* __restrict__ p, const float* __restrict__ rrow,
                                      const float* __restrict__ rcol) {
#pragma omp parallel for num_threads(2) schedule(dynamic, 1)
  for (int64_t k = 0; k < kTasks; ++k) {
    for (int64_t r = k * kTaskRows; r < std::min(R, (k + 1) * kTaskRows); ++r) {
      const float rr = rrow[r];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) p[r * C + c] = p[r * C + c] * 0.99999f + -1e-3f * (g[r * C + c] * rr * rcol[c]);
    }
  }
}

__attribute__((noinline)) void adamw(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                     const AdamWScalars<float> s) {
#pragma omp parallel for num_threads(2) schedule(dynamic, 1)
  for (int64_t c = 0; c < kN; c += 65536) {
    const int64_t end = std::min(kN, c + 65536);
#pragma omp simd
    for (int64_t i = c; i < end; ++i) {
      float p = param[i], m = exp_avg[i], v = exp_avg_sq[i], vmax = 0.0f;
      adamw_element<float, false, false>(p, grad[i], m, v, vmax, s);
      param[i] = p;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
    }
  }
}

// A latency-bound scalar chain: the cores' speed, whatever the memory does.
__attribute__((noinline)) void clock_probe() {
  double total = 0.0;
#pragma omp parallel num_threads(2) reduction(+ : total)
  {
    float x = 1.0f;
    for (int i = 0; i < 2000000; ++i) x = x * 0.999999f + 1e-7f;
    total += x;
  }
  g_sink += total;
}

// The library's whole Adafactor step (fp32, defaults) on the [R, C] arrays.
struct LibraryStep {
  std::vector<float> row_var = std::vector<float>(R, 0.0f), col_var = std::vector<float>(C, 0.0f);
  float step = 0.0f;
  HostTableArrays host;
  LibraryStep(const float* g, float* p) {
    host.table.assign(kAdafactorRows, 0);
    host.table[kAfParam] = int64_t(p);
    host.table[kAfGrad] = int64_t(g);
    host.table[kAfRowVar] = int64_t(row_var.data());
    host.table[kAfColVar] = int64_t(col_var.data());
    host.table[kAfStep] = int64_t(&step);
    host.numel = {kN};
    host.cut_into_chunks(65536);
  }
  void operator()() {
    const int64_t rows[1] = {R}, cols[1] = {C};
    AdafactorHyper h{1e-3, nullptr, -0.8, 1.1920928955078125e-07, 1e-3, 1.0, 0.0, false, false, 0.0, nullptr, nullptr, {}};
    adafactor_factored_cpu(host.tt, rows, cols, h, DType::kFloat32, DType::kFloat32, false, false, 2);
  }
};

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 4;
  std::vector<float> g(kN), p(kN), m(kN, 0.1f), v(kN, 0.01f), x(40000000, 1.0f);
  for (int64_t i = 0; i < kN; ++i) {
    g[size_t(i)] = 0.01f * float((i * 7919) % 1000 - 500) / 500.0f;
    p[size_t(i)] = float((i * 104729) % 1000 - 500) / 500.0f;
  }
  LibraryStep lib(g.data(), p.data());
  std::vector<float> row_var(R, 1e-4f), rrow(R, 1.0f), rcol(C, 1.0f), colp(kTasks * C), colh(kTasks * C);
  const AdamWHyper h(1e-3, nullptr, 0.9, 0.999, 1e-8, 0.01, false, false, nullptr, nullptr);
  const AdamWScalars<float> s = adamw_scalars<float>(h, 1e-3, 10.0);
  const std::vector<std::pair<const char*, std::function<void()>>> loops = {
      {"stream", [&] {
#pragma omp parallel for num_threads(2) schedule(static)
         for (int64_t i = 0; i < int64_t(x.size()); ++i) x[size_t(i)] *= 1.0001f;
       }},
      {"read", [&] { read_bound(g.data(), p.data()); }},
      {"rows", [&] { rows_pass<true>(g.data(), p.data(), row_var.data(), colp.data(), colh.data()); }},
      {"rows -colh", [&] { rows_pass<false>(g.data(), p.data(), row_var.data(), colp.data(), colh.data()); }},
      {"task cols", [&] { task_cols_pass<64, false>(g.data(), p.data(), row_var.data(), colp.data(), colh.data()); }},
      {"task cols +pf", [&] { task_cols_pass<64, true>(g.data(), p.data(), row_var.data(), colp.data(), colh.data()); }},
      {"update", [&] { update(g.data(), p.data(), rrow.data(), rcol.data()); }},
      {"clock", [&] { clock_probe(); }},
      {"lib", [&] { lib(); }},
      {"adamw", [&] { adamw(p.data(), g.data(), m.data(), v.data(), s); }},
  };
  for (int k = 0; k < rounds; ++k) {
    std::vector<std::vector<double>> times(loops.size());
    for (int r = 0; r < 11; ++r) {
      for (size_t f = 0; f < loops.size(); ++f) {
        const auto t0 = std::chrono::steady_clock::now();
        loops[f].second();
        times[f].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    for (auto& t : times) std::sort(t.begin(), t.end());
    std::printf("stream %.0f GB/s |", 0.32 / times[0][times[0].size() / 2]);
    for (size_t f = 1; f < loops.size(); ++f) std::printf(" %s %.2f ms |", loops[f].first, times[f][times[f].size() / 2] * 1e3);
    std::printf("\n");
  }
  return g_sink == 12345.0;
}
