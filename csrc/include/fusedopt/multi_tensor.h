// The description of one multi-tensor launch, shared by the CPU and CUDA
// backends. Plain pointers only: on the CPU they point to host arrays, for CUDA
// to device arrays that the Python side filled once per parameter layout
// (fusedopt/backends/_tables.py).
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

// Tensors are split into fixed-size chunks and the chunks (not the tensors) are
// spread over threads / thread blocks, so one 10M tensor and 200 x 50K tensors
// keep every worker equally busy. Offsets are 64-bit: a tensor may exceed 2^31.
// One chunk: which tensor, its first element, how many elements.
struct Chunk {
  int64_t tensor, start, len;
};

struct TensorTable {
  int64_t n_tensors = 0;
  // table[row * n_tensors + t] is the address of tensor t of list `row`
  // (params, grads, states, ...: the rows are fixed per optimizer).
  const int64_t* table = nullptr;
  const int64_t* numel = nullptr;         // [n_tensors]
  int64_t chunk_size = 0;                 // elements per chunk
  int64_t n_chunks = 0;
  const int64_t* chunk_tensor = nullptr;  // [n_chunks] tensor index of each chunk
  const int64_t* chunk_start = nullptr;   // [n_chunks] first element of each chunk

  template <typename T>
  FUSEDOPT_HD T* ptr(int row, int64_t t) const {
    return reinterpret_cast<T*>(table[row * n_tensors + t]);
  }

  FUSEDOPT_HD Chunk chunk(int64_t c) const {
    const int64_t t = chunk_tensor[c], start = chunk_start[c];
    const int64_t remaining = numel[t] - start;
    return Chunk{t, start, remaining < chunk_size ? remaining : chunk_size};
  }
};

// Rows of the table of the Adam-family kernels (AdamW, LAMB): the same numbers
// as MOMENT_ROWS in fusedopt/backends/_tables.py and kernels/_table.py. A
// kernel that has no use for a row finds 0 there. kRowFp8 / kRowFp8Scale:
// AdamW's FP8 weight copies and the fp32 scale each is cast with.
// kRow*Scale: the block scales of block-scaled FP8 states (fp8_states.h).
enum MomentRow : int {
  kRowParam = 0, kRowGrad = 1, kRowExpAvg = 2, kRowExpAvgSq = 3, kRowMaxExpAvgSq = 4, kRowMaster = 5,
  kRowStep = 6, kRowFp8 = 7, kRowFp8Scale = 8, kRowExpAvgScale = 9, kRowExpAvgSqScale = 10,
  kRowMaxExpAvgSqScale = 11, kMomentRows = 12
};

}  // namespace fusedopt
