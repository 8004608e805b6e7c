// AdamW on the CPU: one OpenMP parallel region over the chunks of every tensor
// of the launch, and a SIMD loop over the elements of each chunk calling the
// shared per-element update (include/fusedopt/adamw.h). No torch headers.
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "fusedopt/adamw.h"
#include "fusedopt/dispatch.h"
#include "fp8_blocks.h"
#include "fp8_cast.h"
#include "parallel.h"
#include "weights.h"

namespace fusedopt {
namespace {

// With master weights the low-precision param is written and never read.
// Storing it through the cache would first read each line in (a write-allocate
// miss); streaming (non-temporal) stores skip that read. The loop fills a small
// L1-resident block which is then streamed out, one vector register at a time:
// the widest the build has (64-byte stores took 0.94-0.96x the time of 16-byte
// ones over a whole bf16 + fp32-master step, 10M params, memory-bound, Zen 4).
constexpr int64_t kStoreBlock = 512;

#if defined(__AVX512F__)
constexpr int64_t kStreamBytes = 64;
inline void stream_vector(void* dst, const void* src) {
  _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
#elif defined(__AVX__)
constexpr int64_t kStreamBytes = 32;
inline void stream_vector(void* dst, const void* src) {
  _mm256_stream_si256(static_cast<__m256i*>(dst), _mm256_loadu_si256(static_cast<const __m256i*>(src)));
}
#elif defined(__SSE2__)
constexpr int64_t kStreamBytes = 16;
inline void stream_vector(void* dst, const void* src) {
  _mm_stream_si128(static_cast<__m128i*>(dst), _mm_loadu_si128(static_cast<const __m128i*>(src)));
}
#else
constexpr int64_t kStreamBytes = 0;  // no streaming stores: plain copies
#endif

// Streaming stores are weakly ordered: a fence publishes them before the launch returns.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename P>
inline void stream_out(P* dst, const P* src, int64_t n) {
  int64_t i = 0;
  if constexpr (kStreamBytes != 0) {
    constexpr int64_t kPerStore = kStreamBytes / int64_t(sizeof(P));
    const auto addr = reinterpret_cast<uintptr_t>(dst);
    if (addr % sizeof(P) == 0) {
      // the elements before the first aligned address go through the cache
      const int64_t head = int64_t((kStreamBytes - addr % kStreamBytes) % kStreamBytes / sizeof(P));
      i = head < n ? head : n;
      std::memcpy(dst, src, size_t(i) * sizeof(P));
      for (; i + kPerStore <= n; i += kPerStore) stream_vector(dst + i, src + i);
    }
  }
  std::memcpy(dst + i, src + i, size_t(n - i) * sizeof(P));
}

// The fp32 working copy an FP8 weight copy is cast from: the master weights,
// or fp32 params themselves (kFp8Copyable: no other combination has copies).
template <typename P>
inline const float* new_weights(const float* master, const P* param) {
  if constexpr (std::is_same<P, float>::value) return master ? master : param;
  else return master;
}

// S: the moments' storage (fp8: block-scaled, StateBlock). FP8: 0 none, else
// 1 + Fp8Format: also write the FP8 weight copy and the chunk's absmax.
template <typename P, typename S, bool MASTER, bool REM, bool AMSGRAD, bool GRAD_MULT, bool SR, int FP8>
void adamw_chunks(const TensorTable& tt, const AdamWHyper& h, int num_threads) {
  constexpr Fp8Format kFormat = FP8 == 2 ? Fp8Format::kE5M2 : Fp8Format::kE4M3FN;
  using T = typename MathOf<P>::type;
  // Per-tensor scalars once, before the parallel region: each tensor has its
  // own step count (params that skipped steps, or state loaded from elsewhere).
  const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
  std::vector<AdamWScalars<T>> scalars(size_t(tt.n_tensors));
  for (int64_t t = 0; t < tt.n_tensors; ++t) {
    float& step = *tt.ptr<float>(kRowStep, t);
    step += 1.0f;  // this step's count (the optimizer's state["step"])
    scalars[size_t(t)] = adamw_scalars<T>(h, lr, double(step));
  }

  parallel_chunks(tt, num_threads, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor, begin = chunk.start, len = chunk.len;
    const AdamWScalars<T> s = scalars[size_t(t)];
    const Weights<P, MASTER, REM, SR> w(tt, kRowParam, kRowMaster, t, begin, h.sr.seed);
    constexpr bool kStaged = Weights<P, MASTER, REM, SR>::kStaged;

    P* __restrict__ param = w.param;
    const P* __restrict__ grad = tt.ptr<const P>(kRowGrad, t) + begin;
    StateBlock<S, false> m(tt, kRowExpAvg, kRowExpAvgScale, t, begin);
    StateBlock<S, true> v(tt, kRowExpAvgSq, kRowExpAvgSqScale, t, begin);
    StateBlock<S, true> vmax(tt, AMSGRAD ? kRowMaxExpAvgSq : kRowExpAvgSq,  // (used only with AMSGRAD)
                             AMSGRAD ? kRowMaxExpAvgSqScale : kRowExpAvgSqScale, t, begin);
    fp8* __restrict__ fp8_copy = FP8 ? tt.ptr<fp8>(kRowFp8, t) + begin : nullptr;
    const float fp8_scale = FP8 ? *tt.ptr<const float>(kRowFp8Scale, t) : 0.0f;
    uint32_t amax_bits = 0;  // max abs_bits(w): NaN-propagating (fp8.h)

    // Blocks: FP8 states are encoded block by block (a scale per kQBlock);
    // with an fp32 master the param goes out through a staged block
    // (stream_out); with FP8 copies each block of new weights is cast from L1
    // right after its update (fp8_cast.h says why not in the same loop), from
    // a staged fp32 block where the new weights are not in memory (REM).
    constexpr bool kFp8States = StateBlock<S, false>::kFp8;
    constexpr bool kBlocked = kFp8States || kStaged || FP8 != 0;
    constexpr int64_t kBlock = kFp8States ? kQBlock : kStoreBlock;
    constexpr bool kStageWeights = REM && FP8 != 0;
    alignas(64) P staged_param[kStaged ? kBlock : 1];
    alignas(64) float staged_weights[kStageWeights ? kBlock : 1];
    for (int64_t b0 = 0; b0 < len; b0 += kBlocked ? kBlock : len) {
      const int64_t b1 = kBlocked && b0 + kBlock < len ? b0 + kBlock : len;
      P* __restrict__ param_out = kStaged ? staged_param - b0 : param;
      float* __restrict__ weights_out = staged_weights - b0;
      const auto mb = m.block(b0), vb = v.block(b0);
      const auto vmaxb = AMSGRAD ? vmax.block(b0) : vb;
#pragma omp simd
      for (int64_t i = 0; i < b1 - b0; ++i) {
        const int64_t e = b0 + i;
        T p = w.template load<T>(e);
        T mi = mb.template get<T>(i), vi = vb.template get<T>(i);
        T vmaxi = AMSGRAD ? vmaxb.template get<T>(i) : T(0);
        adamw_element<T, AMSGRAD, GRAD_MULT>(p, T(to_math(grad[e])), mi, vi, vmaxi, s);
        w.store(e, p, param_out);
        if (kStageWeights) weights_out[e] = float(p);
        mb.set(i, mi);
        vb.set(i, vi);
        if (AMSGRAD) vmaxb.set(i, vmaxi);
      }
      m.end_block(b0, b1 - b0);
      v.end_block(b0, b1 - b0);
      if (AMSGRAD) vmax.end_block(b0, b1 - b0);
      if constexpr (FP8 != 0) {
        const float* fresh = kStageWeights ? staged_weights : new_weights(w.master, param) + b0;
        amax_bits = cast_fp8_span<kFormat>(fresh, fp8_copy + b0, b1 - b0, fp8_scale, amax_bits);
      }
      if constexpr (kStaged) stream_out(param + b0, staged_param, b1 - b0);
    }
    if constexpr (kStaged) stream_fence();
    if constexpr (FP8 != 0) h.fp8.partials[c] = double(bits_to_float(amax_bits));
  });
}

template <typename P, typename S, bool MASTER, bool REM, bool SR, int FP8>
void adamw_flags(const TensorTable& tt, const AdamWHyper& h, int n) {
  const bool mult = h.grad_mult != nullptr;
  if (h.amsgrad && mult) adamw_chunks<P, S, MASTER, REM, true, true, SR, FP8>(tt, h, n);
  else if (h.amsgrad) adamw_chunks<P, S, MASTER, REM, true, false, SR, FP8>(tt, h, n);
  else if (mult) adamw_chunks<P, S, MASTER, REM, false, true, SR, FP8>(tt, h, n);
  else adamw_chunks<P, S, MASTER, REM, false, false, SR, FP8>(tt, h, n);
}

template <typename P, typename S, bool MASTER, bool REM>
void adamw_storage(const TensorTable& tt, const AdamWHyper& h, int n) {
  if constexpr (kStochasticRoundable<P, MASTER>) {
    if (h.sr.on) return adamw_flags<P, S, MASTER, REM, true, 0>(tt, h, n);
  }
  if constexpr (kFp8Copyable<P, MASTER>) {
    if (h.fp8.on && h.fp8.format == Fp8Format::kE4M3FN) return adamw_flags<P, S, MASTER, REM, false, 1>(tt, h, n);
    if (h.fp8.on) return adamw_flags<P, S, MASTER, REM, false, 2>(tt, h, n);
  }
  adamw_flags<P, S, MASTER, REM, false, 0>(tt, h, n);
}

template <typename P, typename S, bool MASTER>
struct AdamWOp {
  static void run(const TensorTable& tt, const AdamWHyper& h, int n) {
    with_remainder<P, MASTER>(h.remainder, [&](auto rem) { adamw_storage<P, S, MASTER, decltype(rem)::value>(tt, h, n); });
  }
};

}  // namespace

void adamw_cpu(const TensorTable& tt, const AdamWHyper& h, DType param_dtype, DType state_dtype, bool has_master,
               int num_threads) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip the step, steps too
  if (tt.n_chunks == 0) return;
  if (!h.fp8.on) return dispatch_storage<AdamWOp, true>(param_dtype, state_dtype, has_master, tt, h, num_threads);
  std::vector<double> partials(size_t(tt.n_chunks));
  AdamWHyper with_partials = h;
  with_partials.fp8.partials = partials.data();
  dispatch_storage<AdamWOp, true>(param_dtype, state_dtype, has_master, tt, with_partials, num_threads);
  for (int64_t t = 0; t < tt.n_tensors; ++t) h.fp8.amax[t] = 0.0;
  for (int64_t c = 0; c < tt.n_chunks; ++c) {  // a max: the order does not matter; NaN sticks
    double& o = h.fp8.amax[tt.chunk_tensor[c]];
    const double v = partials[size_t(c)];
    if (o == o && (v != v || v > o)) o = v;
  }
}

}  // namespace fusedopt
