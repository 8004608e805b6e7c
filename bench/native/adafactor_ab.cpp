// Two builds of the CPU Adafactor launch (csrc/cpu/adafactor.cpp) in one
// process, timed in turn with the library's AdamW step for scale: how a change to the
// factored step moves its time, with the noise of this machine's memory
// (whose speed changes from minute to minute) the same for both.
//
// Shapes: every matrix of bench/cases.py's gpt2-d256-L4 (the embedding
// [50257, 256], the positions [1024, 256], four layers' [256, 768],
// [256, 256], [256, 1024], [1024, 256]) in one launch, fp32, defaults, two
// threads, at torch's 64-byte offset from a page; or one [R, C] tensor
// (arguments). Each round: the median of `reps` steps of each, the three
// contenders in a rotating order, and the in-place stream (x *= 1.0001 over
// 160 MB) that tells the memory's state. First the two builds run three steps
// from the same state and their params are compared bit for bit.
//
// This file is built three times: twice as the step (-DAB_STEP=<source>
// -DAB_NAME=<symbol>; the old build with its namespace renamed), once as the
// driver. From the repository root, against revision REV:
//   F="-O3 -march=native -mprefer-vector-width=512 -fno-math-errno -fno-trapping-math -ffp-contract=off
//      -fopenmp -std=c++17 -Icsrc/include -Icsrc/cpu"
//   git show REV:csrc/cpu/adafactor.cpp > /tmp/adafactor_old.cpp
//   g++ $F -c bench/native/adafactor_ab.cpp -DAB_STEP='"/tmp/adafactor_old.cpp"' -DAB_NAME=step_old
//       -Dfusedopt=fusedopt_old -o /tmp/ab_old.o
//   g++ $F -c bench/native/adafactor_ab.cpp -DAB_STEP='"../../csrc/cpu/adafactor.cpp"' -DAB_NAME=step_new
//       -o /tmp/ab_new.o
//   g++ $F -c bench/native/adafactor_ab.cpp -o /tmp/ab_main.o
//   g++ -fopenmp /tmp/ab_old.o /tmp/ab_new.o /tmp/ab_main.o -o /tmp/adafactor_ab && /tmp/adafactor_ab [rounds reps [R C]]
// (the old build's headers are today's: a change to them needs its own pair.)
// With AB_FLUSH=1 in the environment every timed call follows an untimed
// in-place sweep over 512 MB, as a step follows a backward pass: each starts
// with the caches full of other, dirty data. The builds hold the two slots
// unequally (the second, "new", ran 3-8% faster with the same source on the
// Intel machine): time a change in both orders.
#include <cstdint>
#include <vector>

#include "fusedopt/host_table.h"

#ifdef AB_STEP
#include AB_STEP
using namespace fusedopt;

// One factored launch over n fp32 tensors [R[t], C[t]], chunks as the cpu backend cuts them.
extern "C" void AB_NAME(int n, float* const* g, float* const* p, float* const* row_var, float* const* col_var,
                        float* step, const int64_t* R, const int64_t* C) {
  HostTableArrays host;
  host.table.assign(size_t(kAdafactorRows) * size_t(n), 0);
  for (int t = 0; t < n; ++t) {
    host.numel.push_back(R[t] * C[t]);
    host.table[size_t(kAfParam * n + t)] = int64_t(p[t]);
    host.table[size_t(kAfGrad * n + t)] = int64_t(g[t]);
    host.table[size_t(kAfRowVar * n + t)] = int64_t(row_var[t]);
    host.table[size_t(kAfColVar * n + t)] = int64_t(col_var[t]);
    host.table[size_t(kAfStep * n + t)] = int64_t(step + t);
  }
  host.cut_into_chunks(65536);  // the cpu backend's chunk_size
  const AdafactorHyper h{1e-3, nullptr, -0.8, 1.1920928955078125e-07, 1e-3, 1.0, 0.0, false, false, 0.0, nullptr,
                         nullptr, {}};
  adafactor_factored_cpu(host.tt, R, C, h, DType::kFloat32, DType::kFloat32, false, false, 2);
}

#else
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "../../csrc/cpu/adamw.cpp"  // the library's AdamW step, torch-free

using namespace fusedopt;
using StepFn = void (*)(int, float* const*, float* const*, float* const*, float* const*, float*, const int64_t*,
                        const int64_t*);
extern "C" void step_old(int, float* const*, float* const*, float* const*, float* const*, float*, const int64_t*,
                         const int64_t*);
extern "C" void step_new(int, float* const*, float* const*, float* const*, float* const*, float*, const int64_t*,
                         const int64_t*);

namespace {

// n floats of value v, 64 bytes past a page start (where torch's CPU allocator puts them)
float* page_offset_64(int64_t n, float v) {
  float* b = static_cast<float*>(std::aligned_alloc(4096, size_t((n + 16) * 4 + 4095) / 4096 * 4096)) + 16;
  std::fill(b, b + n, v);
  return b;
}

// One launch's tensors: grads, params and factors (and AdamW's moments).
struct Tensors {
  std::vector<int64_t> R, C, numel;
  std::vector<float*> g, p, row_var, col_var, m, v;
  std::vector<float> step, adamw_step;
  explicit Tensors(std::vector<int64_t> rows, std::vector<int64_t> cols) : R(std::move(rows)), C(std::move(cols)) {
    for (size_t t = 0; t < R.size(); ++t) {
      const int64_t n = R[t] * C[t];
      numel.push_back(n);
      g.push_back(page_offset_64(n, 0.0f));
      p.push_back(page_offset_64(n, 0.0f));
      m.push_back(page_offset_64(n, 0.1f));
      v.push_back(page_offset_64(n, 0.01f));
      for (int64_t i = 0; i < n; ++i) {
        g.back()[i] = 0.01f * float((i * 7919) % 1001 - 500) / 500.0f;
        p.back()[i] = float((i * 104729) % 1000 - 500) / 500.0f;
      }
    }
    adamw_step.assign(R.size(), 0.0f);
    for (size_t t = 0; t < R.size(); ++t) {
      row_var.push_back(page_offset_64(R[t], 0.0f));
      col_var.push_back(page_offset_64(C[t], 0.0f));
    }
    step.assign(R.size(), 0.0f);
  }
  void reset() {  // zeroed factors and steps, as at the first step
    for (size_t t = 0; t < R.size(); ++t) {
      std::fill(row_var[t], row_var[t] + R[t], 0.0f);
      std::fill(col_var[t], col_var[t] + C[t], 0.0f);
    }
    step.assign(R.size(), 0.0f);
  }
  void adafactor(StepFn fn) {
    fn(int(R.size()), g.data(), p.data(), row_var.data(), col_var.data(), step.data(), R.data(), C.data());
  }
};

// The library's fp32 AdamW step (csrc/cpu/adamw.cpp) on the same params and grads.
__attribute__((noinline)) void adamw(Tensors& x, const AdamWHyper& h) {
  const size_t n = x.R.size();
  HostTableArrays host;
  host.table.assign(size_t(kMomentRows) * n, 0);
  for (size_t t = 0; t < n; ++t) {
    host.numel.push_back(x.numel[t]);
    host.table[kRowParam * n + t] = int64_t(x.p[t]);
    host.table[kRowGrad * n + t] = int64_t(x.g[t]);
    host.table[kRowExpAvg * n + t] = int64_t(x.m[t]);
    host.table[kRowExpAvgSq * n + t] = int64_t(x.v[t]);
    host.table[kRowStep * n + t] = int64_t(&x.adamw_step[t]);
  }
  host.cut_into_chunks(65536);
  adamw_cpu(host.tt, h, DType::kFloat32, DType::kFloat32, false, 2);
}

// Params of both builds after three steps from the same state: how many differ.
void compare_bits(Tensors& x) {
  std::vector<std::vector<float>> start;
  for (size_t t = 0; t < x.R.size(); ++t) start.emplace_back(x.p[t], x.p[t] + x.numel[t]);
  std::vector<std::vector<float>> after[2];
  for (int b = 0; b < 2; ++b) {
    for (size_t t = 0; t < x.R.size(); ++t) std::copy(start[t].begin(), start[t].end(), x.p[t]);
    x.reset();
    for (int s = 0; s < 3; ++s) x.adafactor(b == 0 ? step_old : step_new);
    for (size_t t = 0; t < x.R.size(); ++t) after[b].emplace_back(x.p[t], x.p[t] + x.numel[t]);
  }
  int64_t differ = 0, total = 0;
  for (size_t t = 0; t < x.R.size(); ++t)
    for (int64_t i = 0; i < x.numel[t]; ++i, ++total) differ += after[0][t][size_t(i)] != after[1][t][size_t(i)];
  std::printf("params after 3 steps: %lld of %lld differ between the builds\n", (long long)differ, (long long)total);
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 4, reps = argc > 2 ? std::atoi(argv[2]) : 21;
  std::vector<int64_t> R = {50257, 1024}, C = {256, 256};
  if (argc > 4) {
    R = {std::atoll(argv[3])};
    C = {std::atoll(argv[4])};
  } else {
    for (int l = 0; l < 4; ++l) {
      R.insert(R.end(), {256, 256, 256, 1024});
      C.insert(C.end(), {768, 256, 1024, 256});
    }
  }
  Tensors x(R, C);
  compare_bits(x);
  std::vector<float> stream(40000000, 1.0f);
  const bool flush = std::getenv("AB_FLUSH") != nullptr;
  std::vector<float> sweep(flush ? size_t(128) << 20 : 0, 1.0f);
  const AdamWHyper h(1e-3, nullptr, 0.9, 0.999, 1e-8, 0.01, false, false, nullptr, nullptr);
  for (int k = 0; k < rounds; ++k) {
    std::vector<double> t[4];  // old, new, adamw, stream
    for (int r = 0; r < reps; ++r) {
      for (int j = 0; j < 4; ++j) {
        const int which = (j + r) % 4;
        if (flush) {
#pragma omp parallel for num_threads(2) schedule(static)
          for (int64_t i = 0; i < int64_t(sweep.size()); ++i) sweep[size_t(i)] *= 1.0001f;
        }
        const auto t0 = std::chrono::steady_clock::now();
        if (which == 0) x.adafactor(step_old);
        if (which == 1) x.adafactor(step_new);
        if (which == 2) adamw(x, h);
        if (which == 3) {
#pragma omp parallel for num_threads(2) schedule(static)
          for (int64_t i = 0; i < int64_t(stream.size()); ++i) stream[size_t(i)] *= 1.0001f;
        }
        t[which].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    double med[4];
    for (int j = 0; j < 4; ++j) {
      std::sort(t[j].begin(), t[j].end());
      med[j] = t[j][t[j].size() / 2];
    }
    std::printf("stream %.0f GB/s | old %.3f ms (%.3fx AdamW) | new %.3f ms (%.3fx AdamW) | AdamW %.3f ms | new/old %.3f\n",
                2.0 * 4e7 * 4 / med[3] / 1e9, med[0] * 1e3, med[0] / med[2], med[1] * 1e3, med[1] / med[2],
                med[2] * 1e3, med[1] / med[0]);
  }
  return 0;
}
#endif
