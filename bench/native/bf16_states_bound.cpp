// Is the CPU AdamW step with bf16 states bound by its arithmetic or by the
// memory system? (README, "Benchmarks": the bf16-state target in the
// high-bandwidth state.) Four loops over the same 10M-element arrays, timed
// round-robin so that a change of the machine's memory state hits them all:
//
//   fp32 step   the AdamW update of csrc/include/fusedopt/adamw.h, fp32 states (28 B/param)
//   bf16 step   the same with bf16 states                                  (20 B/param)
//   fp32 bytes  the same loads, conversions and stores, one add per array instead of the update
//   bf16 bytes  likewise with bf16 states
//
// If "bf16 bytes / fp32 bytes" is well above 20/28, the memory system does not
// reward the narrower states whatever the arithmetic. The adds never reach
// denormals (a loop that halved its values did, and slowed down for it).
//
// Build (the cpu backend's flags: fusedopt/_jit.py) and run from the
// repository root; 2 threads, as on the CI-class machine:
//   g++ -O3 -march=native -mprefer-vector-width=512 -fno-math-errno -fno-trapping-math
//       -ffp-contract=off -fopenmp -std=c++17 -Icsrc/include bench/native/bf16_states_bound.cpp
//       -o /tmp/bf16_states_bound && /tmp/bf16_states_bound 4
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "fusedopt/adamw.h"

using namespace fusedopt;

namespace {

constexpr int64_t kN = 10000000, kChunk = 65536;

// MODE 0: the AdamW update; 1: one add per array (the bytes alone).
template <typename S, int MODE>
__attribute__((noinline)) void step(float* __restrict__ param, const float* __restrict__ grad, S* __restrict__ exp_avg,
                                    S* __restrict__ exp_avg_sq, const AdamWScalars<float> s) {
#pragma omp parallel for num_threads(2) schedule(dynamic, 1)
  for (int64_t c = 0; c < kN; c += kChunk) {
    const int64_t end = std::min(kN, c + kChunk);
#pragma omp simd
    for (int64_t i = c; i < end; ++i) {
      float p = param[i], m = to_math(exp_avg[i]), v = to_math(exp_avg_sq[i]), vmax = 0.0f;
      if (MODE == 0) {
        adamw_element<float, false, false>(p, grad[i], m, v, vmax, s);
      } else {
        p = p + grad[i];
        m = m + 1.0f;
        v = v - 1.0f;
      }
      param[i] = p;
      exp_avg[i] = Store<S>::from(m);
      exp_avg_sq[i] = Store<S>::from(v);
    }
  }
}

template <typename T>
std::vector<T> filled(int64_t n, T value) {
  return std::vector<T>(size_t(n), value);
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 4;
  auto p = filled(kN, 0.5f), g = filled(kN, 0.01f), m = filled(kN, 0.1f), v = filled(kN, 0.01f);
  auto m16 = filled(kN, Store<bf16>::from(0.1f)), v16 = filled(kN, Store<bf16>::from(0.01f));
  auto x = filled(4 * kN, 1.0f);  // 160 MB for the in-place stream
  const AdamWHyper h(1e-3, nullptr, 0.9, 0.999, 1e-8, 0.01, false, false, nullptr, nullptr);
  const AdamWScalars<float> s = adamw_scalars<float>(h, 1e-3, 10.0);
  const std::vector<std::function<void()>> loops = {
      [&] {
#pragma omp parallel for num_threads(2) schedule(static)
        for (int64_t i = 0; i < 4 * kN; ++i) x[size_t(i)] *= 1.0001f;
      },
      [&] { step<float, 0>(p.data(), g.data(), m.data(), v.data(), s); },
      [&] { step<bf16, 0>(p.data(), g.data(), m16.data(), v16.data(), s); },
      [&] { step<float, 1>(p.data(), g.data(), m.data(), v.data(), s); },
      [&] { step<bf16, 1>(p.data(), g.data(), m16.data(), v16.data(), s); },
  };
  for (int k = 0; k < rounds; ++k) {
    std::vector<std::vector<double>> times(loops.size());
    for (int r = 0; r < 15; ++r) {
      for (size_t f = 0; f < loops.size(); ++f) {
        const auto t0 = std::chrono::steady_clock::now();
        loops[f]();
        times[f].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    double med[5];
    for (size_t f = 0; f < loops.size(); ++f) {
      std::sort(times[f].begin(), times[f].end());
      med[f] = times[f][times[f].size() / 2] * 1e3;
    }
    std::printf("stream %.0f GB/s | step: fp32 %.2f ms, bf16 %.2f ms (%.3fx) | bytes: fp32 %.2f ms, bf16 %.2f ms (%.3fx)\n",
                320.0 / med[0], med[1], med[2], med[2] / med[1], med[3], med[4], med[4] / med[3]);
  }
}
