// The CPU backend's parallel constructs: OpenMP loops over the chunks of the
// tensors of a launch (dynamic scheduling, because chunks of small tensors
// are short and an equal count of chunks is not an equal amount of work),
// and over tasks that two passes visit in turn (parallel_affine).
#pragma once

#include "fusedopt/multi_tensor.h"

namespace fusedopt {

// body(c, chunk) for every chunk c in [c0, c1), spread over `num_threads` threads;
// a single chunk runs on the calling thread (waking a team costs more than a tiny step).
template <typename Body>
void parallel_chunks(const TensorTable& tt, int64_t c0, int64_t c1, int num_threads, Body&& body) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (c1 - c0 > 1)
  for (int64_t c = c0; c < c1; ++c) body(c, tt.chunk(c));
}

// body(k) for every k in [k0, k1), each thread taking the same k from one
// call to the next as long as the range is the same: a contiguous share of
// the first (1 - 1/kDynamicTail) of the range per thread (OpenMP's static
// schedule), the rest dynamically, so a thread that finishes its share
// early takes the tail from one slowed by a neighbour. For passes over the
// same data one after another: a task's data is then read again by the core
// that read it before, from its own caches. (On the 2-vCPU CI machine, for
// minutes at a time, memory streams ~1.6x faster and data read on one core
// reaches the other slower than from memory, as if the two sat on two CCDs:
// Adafactor's update, run in cache-sized waves after pass 1 with tasks going
// to either thread, took 1.5x as long as from memory; with the tasks kept
// per thread the launch takes 0.78-0.82x the time it took in one wave with
// dynamic scheduling, 0.81-0.85x without the waves:
// bench/native/adafactor_ab.cpp.)
template <typename Body>
void parallel_affine(int64_t k0, int64_t k1, int num_threads, Body&& body) {
  constexpr int64_t kDynamicTail = 8;
  const int64_t fixed_end = k1 - (k1 - k0) / kDynamicTail;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t k = k0; k < fixed_end; ++k) body(k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = fixed_end; k < k1; ++k) body(k);
  }
}

// body(c, chunk) for every chunk c of the launch.
template <typename Body>
void parallel_chunks(const TensorTable& tt, int num_threads, Body&& body) {
  parallel_chunks(tt, 0, tt.n_chunks, num_threads, body);
}

}  // namespace fusedopt
