// What the bindings (the only files that see torch) check of every tensor
// before they take its data pointer.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

namespace fusedopt {

// A tensor subclass that intercepts dispatch (a DTensor, a FakeTensor) is a
// wrapper whose data pointer is not its data (a DTensor's is null): a kernel
// would read and write through it. The optimizers hand a DTensor's local shard.
inline void check_plain(const at::Tensor& t, const char* backend, const char* what) {
  TORCH_CHECK(!t.key_set().has(c10::DispatchKey::Python) &&
                  (t.numel() == 0 || (t.has_storage() && t.const_data_ptr() != nullptr)),
              "fusedopt ", backend, ": ", what, " is a tensor subclass (a DTensor, a FakeTensor, ...) or has no "
              "memory; the kernels take plain tensors (a DTensor's local shard: its to_local())");
}

// t's data pointer, after check_plain.
template <typename T>
T* checked_ptr(const at::Tensor& t, const char* backend, const char* what) {
  check_plain(t, backend, what);
  if constexpr (std::is_void_v<T>) {
    return t.data_ptr();
  } else {
    return t.data_ptr<T>();
  }
}

}  // namespace fusedopt
