// From runtime (param dtype, state dtype, master weights) to the storage types
// of a kernel template: P for params and grads, S for the elementwise states,
// MASTER whether an fp32 master exists (then it is what the update reads and
// writes). By default states take the param's dtype (as torch's fused AdamW)
// or fp32 with master weights; state_dtype=bf16 stores them in bf16 instead,
// and kFp8Blocked (S = fp8) in block-scaled e4m3fn (fp8_states.h), for the ops
// whose kernels are built for it (FP8_STATES).
// Host code, shared by the CPU and CUDA launchers.
#pragma once

#include <type_traits>

#include "fusedopt/fp8.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

// Whether (param, state, master) is a combination the kernels are built for.
inline bool supported_storage(DType param_dtype, DType state_dtype, bool has_master, bool fp8_states = false) {
  const bool low = param_dtype == DType::kBFloat16 || param_dtype == DType::kFloat16;
  if (has_master && !low) return false;
  if (param_dtype == DType::kFp8Blocked) return false;
  if (state_dtype == DType::kBFloat16) return true;
  if (state_dtype == DType::kFp8Blocked) return fp8_states;
  return state_dtype == (has_master ? DType::kFloat32 : param_dtype);
}

// Op<P, S, MASTER>::run(args...) for a supported (param, state, master) combination.
template <template <typename, typename, bool> class Op, bool FP8_STATES = false, typename... Args>
void dispatch_storage(DType param_dtype, DType state_dtype, bool has_master, Args&&... args) {
  if constexpr (FP8_STATES) {
    if (state_dtype == DType::kFp8Blocked) {
      switch (param_dtype) {
        case DType::kFloat32: return Op<float, fp8, false>::run(args...);
        case DType::kFloat64: return Op<double, fp8, false>::run(args...);
        case DType::kBFloat16:
          return has_master ? Op<bf16, fp8, true>::run(args...) : Op<bf16, fp8, false>::run(args...);
        case DType::kFloat16:
          return has_master ? Op<fp16, fp8, true>::run(args...) : Op<fp16, fp8, false>::run(args...);
        default: return;
      }
    }
  }
  const bool bf16_states = state_dtype == DType::kBFloat16;
  switch (param_dtype) {
    case DType::kFloat32:
      if (bf16_states) Op<float, bf16, false>::run(args...);
      else Op<float, float, false>::run(args...);
      break;
    case DType::kFloat64:
      if (bf16_states) Op<double, bf16, false>::run(args...);
      else Op<double, double, false>::run(args...);
      break;
    case DType::kBFloat16:
      if (has_master && bf16_states) Op<bf16, bf16, true>::run(args...);
      else if (has_master) Op<bf16, float, true>::run(args...);
      else Op<bf16, bf16, false>::run(args...);
      break;
    case DType::kFloat16:
      if (has_master && bf16_states) Op<fp16, bf16, true>::run(args...);
      else if (has_master) Op<fp16, float, true>::run(args...);
      else if (bf16_states) Op<fp16, bf16, false>::run(args...);
      else Op<fp16, fp16, false>::run(args...);
      break;
    default:
      break;
  }
}

// f(std::bool_constant<REM>{}): REM when the masters are int16 remainders of bf16
// params (master_weights="remainder"; the hyperparameters' `remainder`), which
// only Op<bf16, S, true> instantiates.
template <typename P, bool MASTER, typename F>
void with_remainder(bool remainder, F&& f) {
  if constexpr (MASTER && std::is_same<P, bf16>::value) {
    if (remainder) return f(std::true_type{});
  }
  f(std::false_type{});
}

}  // namespace fusedopt
