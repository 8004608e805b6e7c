// Software prefetch for the CPU backend's read-only streams.
//
// On the 2-vCPU machines this project runs on, a pass that only reads (a
// reduction) gets far less bandwidth than one that reads and writes: summing
// the squares of two 51 MB fp32 arrays ran at 31-35 GB/s while p = a*p + b*g
// over the same arrays moved 55-63 GB/s in the same run (Intel Xeon, 2 cores).
// The hardware prefetchers keep too few lines in flight for a core that
// writes nothing; asking for the lines 2 KB ahead, into L1, brought the
// reduction to 41-48 GB/s (4 KB: the same). The update pass gained nothing
// from it in that loop, where part of its data stayed in cache from step to
// step, but ~6% when every step started with the caches full of other dirty
// data (as after a backward pass): Adafactor's update uses it too. AdamW's
// update (four streams read, three written) got slower with it: 1.12-1.22x
// torch's fused step instead of 0.91-0.93x (1x10M, bench adamw), so it does
// not use it.
#pragma once

#include <cstdint>

namespace fusedopt {

// How far ahead of the element being read the lines are requested.
constexpr int64_t kPrefetchAheadBytes = 2048;

// Ask for the cache lines of [base + kPrefetchAheadBytes, + bytes): the
// lines the stream at `base` will read `bytes` from now. A hint: it never
// faults, so it may run past the end of the array (the address is formed
// as an integer, never as a pointer past the array).
inline void prefetch_ahead(const void* base, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(base) + uintptr_t(kPrefetchAheadBytes);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(first + uintptr_t(o)), 0, 3);
}

}  // namespace fusedopt
