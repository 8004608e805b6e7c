// How a CPU chunk reads and writes its weights: the param itself, an fp32
// master beside it (kStaged: the kernel may send the param out through a
// staged block, which adamw.cpp streams), or (REM, master_weights="remainder")
// the bf16 param with its int16 remainder in the master row, joined into the
// fp32 master and split back (numeric.h), both read and written in place.
#pragma once

#include <type_traits>

#include "fusedopt/multi_tensor.h"
#include "fusedopt/numeric.h"

namespace fusedopt {

template <typename P, bool MASTER, bool REM, bool SR>
struct Weights {
  static_assert(!REM || (MASTER && std::is_same<P, bf16>::value), "remainders complete bf16 params");
  static constexpr bool kStaged = MASTER && !REM;  // an fp32 master array
  static constexpr bool kRemainder = REM;
  P* __restrict__ param;
  float* __restrict__ master;
  int16_t* __restrict__ rem;
  uint32_t sr_key;
  int64_t begin;

  // the chunk of tensor t that starts at element `begin`; rows: where the params and the masters are
  Weights(const TensorTable& tt, int param_row, int master_row, int64_t t, int64_t begin_, uint32_t seed)
      : param(tt.ptr<P>(param_row, t) + begin_),
        master(kStaged ? tt.ptr<float>(master_row, t) + begin_ : nullptr),
        rem(REM ? tt.ptr<int16_t>(master_row, t) + begin_ : nullptr),
        sr_key(SR ? sr_tensor_key(seed, t) : 0u),
        begin(begin_) {}

  template <typename T>
  T load(int64_t i) const {
    if constexpr (REM) return T(join_remainder(param[i], rem[i]));
    else if constexpr (MASTER) return T(master[i]);
    else return T(to_math(param[i]));
  }

  // param_out: where the param goes (a staged block with an fp32 master, else param)
  template <typename T>
  void store(int64_t i, T p, P* __restrict__ param_out) const {
    if constexpr (REM) {
      param[i] = split_remainder(float(p), rem[i]);
    } else {
      if constexpr (MASTER) master[i] = float(p);
      param_out[i] = store_param<P, SR>(p, sr_key, begin + i);
    }
  }

  template <typename T>
  void store(int64_t i, T p) const { store(i, p, param); }

  // the same weights from element `by` on
  Weights offset(int64_t by) const {
    Weights w = *this;
    w.param += by;
    if (kStaged) w.master += by;
    if (REM) w.rem += by;
    w.begin += by;
    return w;
  }
};

}  // namespace fusedopt
