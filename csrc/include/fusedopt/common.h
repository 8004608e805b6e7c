// Shared definitions for the CPU and CUDA backends. No torch headers here: the
// CUDA sources must compile with a bare `nvcc -c` on machines without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {

// Storage dtype codes. The Python side (fusedopt/backends/_dtypes.py) uses the
// same numbers; keep the two in sync.
// kFp8Blocked: block-scaled e4m3fn optimizer states (fp8_states.h), states only.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kFp8Blocked = 4 };

}  // namespace fusedopt
