// Is the CPU AdamW step with bf16 states bound by its arithmetic or by the
// memory system? (README, "Benchmarks": the bf16-state target in the
// high-bandwidth state.) Loops over the same arrays, timed round-robin so
// that a change of the machine's memory state hits them all:
//
//   fp32 step   the AdamW update of csrc/include/fusedopt/adamw.h, fp32 states (28 B/param)
//   bf16 step   the same with bf16 states                                  (20 B/param)
//   fp32 bytes  the same loads, conversions and stores, one add per array instead of the update
//   bf16 bytes  likewise with bf16 states
//   bf16 hand   (AVX-512 BF16 builds) the bf16-state step written by hand with
//               the least arithmetic that keeps its bits: vcvtne2ps2bf16 for the
//               stores (checked for the NaN and subnormal inputs on which it
//               differs from round-to-nearest-even) and sqrt(v) / bc2_sqrt as a
//               product corrected by two FMAs instead of a division (Markstein:
//               correctly rounded while neither the quotient nor the remainder
//               leaves the normal range, as for sqrt(v) of any fp32 v; checked
//               bit for bit over every such input for a dozen bc2_sqrt values,
//               2026-11-30); not the library's code (DESIGN.md: the
//               update is written once, in adamw.h), a bound on what code can do
//
// If "bf16 bytes / fp32 bytes" is well above 20/28, the memory system does not
// reward the narrower states whatever the arithmetic; "bf16 hand / fp32 step"
// is about the best ratio any code reaches. With a second argument N < 10M the
// arrays hold N elements and each timing repeats the loop to 10M elements:
// in cache (N = 131072 on 2 cores) that is the arithmetic's own cost. The adds
// never reach denormals (a loop that halved its values did, and slowed down for it).
//
// Build (the cpu backend's flags: fusedopt/_jit.py) and run from the
// repository root; 2 threads, as on the CI-class machine:
//   g++ -O3 -march=native -mprefer-vector-width=512 -fno-math-errno -fno-trapping-math
//       -ffp-contract=off -fopenmp -std=c++17 -Icsrc/include bench/native/bf16_states_bound.cpp
//       -o /tmp/bf16_states_bound && /tmp/bf16_states_bound 4 [N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "fusedopt/adamw.h"

using namespace fusedopt;

namespace {

int64_t kN = 10000000;  // elements per array (argument 2)
constexpr int64_t kChunk = 65536;

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

#if defined(__AVX512BF16__)
// 16 bf16 -> 16 fp32
inline __m512 load_bf16(const bf16* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16));
}

// The bf16-state step by hand (see the header). Returns false if a chunk held
// a NaN or subnormal moment (where vcvtne2ps2bf16 and round-to-nearest-even
// differ): the timing is then void, and the loop says so.
__attribute__((noinline)) bool step_bf16_hand(float* __restrict__ param, const float* __restrict__ grad,
                                              bf16* __restrict__ exp_avg, bf16* __restrict__ exp_avg_sq,
                                              const AdamWScalars<float> s) {
  bool exact = true;
#pragma omp parallel for num_threads(2) schedule(dynamic, 1) reduction(&& : exact)
  for (int64_t c = 0; c < kN; c += kChunk) {
    const int64_t end = std::min(kN, c + kChunk);
    const __m512 decay = _mm512_set1_ps(s.decay), w = _mm512_set1_ps(s.lerp_w), beta2 = _mm512_set1_ps(s.beta2),
                 one_minus_beta2 = _mm512_set1_ps(s.one_minus_beta2), eps = _mm512_set1_ps(s.eps),
                 step_size = _mm512_set1_ps(s.step_size), bc2 = _mm512_set1_ps(s.bc2_sqrt),
                 inv_bc2 = _mm512_set1_ps(1.0f / s.bc2_sqrt);
    __mmask16 special = 0;
    for (int64_t i = c; i + 32 <= end; i += 32) {  // kN and kChunk: multiples of 32 here
      __m512 m[2], v[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t j = i + 16 * h;
        const __m512 g = _mm512_loadu_ps(grad + j);
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(param + j), decay);
        m[h] = load_bf16(exp_avg + j);
        m[h] = _mm512_fmadd_ps(w, _mm512_sub_ps(g, m[h]), m[h]);  // lerp, weight < 0.5
        v[h] = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g, _mm512_mul_ps(load_bf16(exp_avg_sq + j), beta2));
        const __m512 root = _mm512_sqrt_ps(v[h]);
        __m512 q = _mm512_mul_ps(root, inv_bc2);
        __m512 r = _mm512_fnmadd_ps(q, bc2, root);                    // exact remainder
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // inf / NaN: keep q
        q = _mm512_fmadd_ps(r, inv_bc2, q);                          // = RN(root / bc2)
        p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step_size, m[h]), _mm512_add_ps(q, eps)));
        _mm512_storeu_ps(param + j, p);
        special |= _mm512_fpclass_ps_mask(m[h], 0xA1) | _mm512_fpclass_ps_mask(v[h], 0xA1);  // NaN, subnormal
      }
      _mm512_storeu_si512(exp_avg + i, (__m512i)_mm512_cvtne2ps_pbh(m[1], m[0]));
      _mm512_storeu_si512(exp_avg_sq + i, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    }
    exact = exact && special == 0;
  }
  return exact;
}
#endif

template <typename T>
std::vector<T> filled(int64_t n, T value) {
  return std::vector<T>(size_t(n), value);
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 4;
  if (argc > 2) kN = std::min<int64_t>(10000000, std::max<int64_t>(32, std::atol(argv[2]) / 32 * 32));
  const int64_t repeat = 10000000 / kN;  // each timing covers ~10M elements
  auto p = filled(kN, 0.5f), g = filled(kN, 0.01f), m = filled(kN, 0.1f), v = filled(kN, 0.01f);
  auto m16 = filled(kN, Store<bf16>::from(0.1f)), v16 = filled(kN, Store<bf16>::from(0.01f));
  auto x = filled(int64_t(repeat > 1 ? 0 : 40000000), 1.0f);  // 160 MB for the in-place stream
  const AdamWHyper h(1e-3, nullptr, 0.9, 0.999, 1e-8, 0.01, false, false, nullptr, nullptr);
  const AdamWScalars<float> s = adamw_scalars<float>(h, 1e-3, 10.0);
  bool exact = true;
  auto repeated = [&](auto&& f) { return [&, f] { for (int64_t r = 0; r < repeat; ++r) f(); }; };
  std::vector<std::function<void()>> loops = {
      [&] {  // in cache (repeat > 1) the stream would only flush the caches between loops
        if (repeat > 1) return;
#pragma omp parallel for num_threads(2) schedule(static)
        for (int64_t i = 0; i < int64_t(x.size()); ++i) x[size_t(i)] *= 1.0001f;
      },
      repeated([&] { step<float, 0>(p.data(), g.data(), m.data(), v.data(), s); }),
      repeated([&] { step<bf16, 0>(p.data(), g.data(), m16.data(), v16.data(), s); }),
      repeated([&] { step<float, 1>(p.data(), g.data(), m.data(), v.data(), s); }),
      repeated([&] { step<bf16, 1>(p.data(), g.data(), m16.data(), v16.data(), s); }),
  };
#if defined(__AVX512BF16__)
  loops.push_back(repeated([&] { exact = step_bf16_hand(p.data(), g.data(), m16.data(), v16.data(), s) && exact; }));
#endif
  std::printf("%ld elements per array, x%ld per timing\n", long(kN), long(repeat));
  for (int k = 0; k < rounds; ++k) {
    std::vector<std::vector<double>> times(loops.size());
    for (int r = 0; r < 15; ++r) {
      for (size_t f = 0; f < loops.size(); ++f) {
        const auto t0 = std::chrono::steady_clock::now();
        loops[f]();
        times[f].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    std::vector<double> med(loops.size());
    for (size_t f = 0; f < loops.size(); ++f) {
      std::sort(times[f].begin(), times[f].end());
      med[f] = times[f][times[f].size() / 2] * 1e3;
    }
    if (repeat > 1) std::printf("in cache");
    else std::printf("stream %.0f GB/s", 320.0 / med[0]);
    std::printf(" | step: fp32 %.2f ms, bf16 %.2f ms (%.3fx) | bytes: fp32 %.2f ms, bf16 %.2f ms (%.3fx)",
                med[1], med[2], med[2] / med[1], med[3], med[4], med[4] / med[3]);
    if (loops.size() > 5) std::printf(" | bf16 hand %.2f ms (%.3fx)%s", med[5], med[5] / med[1], exact ? "" : " VOID: special values");
    std::printf("\n");
  }
}
