// A TensorTable over host arrays, with the arrays it points into: the CPU
// bindings fill it from tensors (csrc/bindings_cpu.cpp), the standalone C++
// benchmarks from plain arrays (bench/native/). Host code only.
#pragma once

#include <cstddef>
#include <vector>

#include "fusedopt/multi_tensor.h"

namespace fusedopt {

struct HostTableArrays {
  std::vector<int64_t> table, numel, chunk_tensor, chunk_start;
  TensorTable tt;

  // With `table` ([rows x n_tensors] addresses) and `numel` filled: cut every
  // tensor into chunks of chunk_size elements, in tensor order, and point tt
  // at the arrays.
  void cut_into_chunks(int64_t chunk_size) {
    chunk_tensor.clear();
    chunk_start.clear();
    for (int64_t t = 0; t < int64_t(numel.size()); ++t) {
      for (int64_t start = 0; start < numel[std::size_t(t)]; start += chunk_size) {
        chunk_tensor.push_back(t);
        chunk_start.push_back(start);
      }
    }
    tt.n_tensors = int64_t(numel.size());
    tt.table = table.data();
    tt.numel = numel.data();
    tt.chunk_size = chunk_size;
    tt.n_chunks = int64_t(chunk_start.size());
    tt.chunk_tensor = chunk_tensor.data();
    tt.chunk_start = chunk_start.data();
  }
};

}  // namespace fusedopt
