// From runtime (param dtype, master weights) to the storage types of a
// kernel template: P for params and grads, S for the states (and the working
// copy: the param itself, or the fp32 master), MASTER whether a master exists.
// Low-precision params keep their states in their own dtype (as torch's fused
// AdamW does) unless they have fp32 master weights. Host code, shared by the
// CPU and CUDA launchers.
#pragma once

#include "fusedopt/numeric.h"

namespace fusedopt {

// Op<P, S, MASTER>::run(args...) for the storage types of (dtype, has_master).
template <template <typename, typename, bool> class Op, typename... Args>
void dispatch_storage(DType param_dtype, bool has_master, Args&&... args) {
  switch (param_dtype) {
    case DType::kFloat32: Op<float, float, false>::run(args...); break;
    case DType::kFloat64: Op<double, double, false>::run(args...); break;
    case DType::kBFloat16:
      if (has_master) Op<bf16, float, true>::run(args...);
      else Op<bf16, bf16, false>::run(args...);
      break;
    case DType::kFloat16:
      if (has_master) Op<fp16, float, true>::run(args...);
      else Op<fp16, fp16, false>::run(args...);
      break;
  }
}

}  // namespace fusedopt
