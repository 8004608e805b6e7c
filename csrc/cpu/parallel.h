// The CPU backend's one parallel construct: an OpenMP loop over the chunks of
// every tensor of a launch. Dynamic scheduling, because chunks of small
// tensors are short and an equal count of chunks is not an equal amount of work.
#pragma once

#include "fusedopt/multi_tensor.h"

namespace fusedopt {

// body(c, chunk) for every chunk c, spread over `num_threads` threads.
template <typename Body>
void parallel_chunks(const TensorTable& tt, int num_threads, Body&& body) {
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < tt.n_chunks; ++c) body(c, tt.chunk(c));
}

}  // namespace fusedopt
