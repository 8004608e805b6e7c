// Enough of CUDA's device model to run csrc/cuda/*.cu on the CPU, for the
// tests only (tests/conftest.py: the "cuda" backend on machines without a
// GPU): no GPU has been lent to this project yet, and this is how its CUDA
// kernels run at all before one is.
//
// A launch runs its blocks one after another. A block's threads are fibers on
// the calling thread, each run until it returns or reaches a barrier:
// __syncthreads() waits for every thread of the block that has not returned,
// __shfl_xor_sync for the 32 lanes of its warp. __shared__ variables are
// static locals: one per kernel, shared by the block's threads. The fibers
// switch only at barriers (between two barriers the threads run in thread
// order, then in reverse order, alternately), so the emulation checks the
// kernels' indexing, reductions, barriers and block logic, not every race a
// GPU's interleaving could expose; a barrier that not every thread reaches
// aborts with a message.
//
// Fibers are created once and reused: on x86-64 they switch with a few
// instructions (callee-saved registers and the stack pointer), elsewhere
// with ucontext (which makes a system call per switch, so it is slower).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#if defined(__x86_64__)
// emu_switch(&from, to): save the callee-saved registers on this stack, store
// its pointer in *from, and resume the fiber whose stack pointer is `to`.
// Weak: every translation unit that includes this header defines it.
extern "C" void emu_switch(void** from, void* to);
asm(R"(
  .text
  .weak emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
#endif

namespace emu {

constexpr size_t kStack = 1 << 16;

struct Fiber {
  std::unique_ptr<char[]> stack{new char[kStack]};
  bool done = true;
  int waiting = 0;  // 0: runnable, 1: at __syncthreads, 2: at a warp barrier
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct Block {
  unsigned index = 0, size = 0, current = 0;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> lanes;  // the shuffles' exchange, one slot per thread
  const std::function<void()>* body = nullptr;
#if defined(__x86_64__)
  void* scheduler = nullptr;
#else
  ucontext_t scheduler;
#endif
};

inline Block& block() {
  static Block b;
  return b;
}

// From the running fiber back to the scheduler.
inline void yield() {
  Block& b = block();
#if defined(__x86_64__)
  emu_switch(&b.fibers[b.current].sp, b.scheduler);
#else
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
#endif
}

// From the scheduler into fiber t.
inline void resume(unsigned t) {
  Block& b = block();
  b.current = t;
#if defined(__x86_64__)
  emu_switch(&b.scheduler, b.fibers[t].sp);
#else
  swapcontext(&b.scheduler, &b.fibers[t].context);
#endif
}

// A fiber's life: run the kernel for each block it is given.
[[noreturn]] inline void fiber_main() {
  for (;;) {
    Block& b = block();
    (*b.body)();
    b.fibers[b.current].done = true;
    yield();
  }
}

inline void start(Fiber& f) {
#if defined(__x86_64__)
  // A stack that emu_switch "returns" into fiber_main from: six register
  // slots, then fiber_main's address, with the alignment of a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStack) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  sp[7] = nullptr;
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kStack;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#endif
}

inline void wait(int kind) {
  block().fibers[block().current].waiting = kind;
  yield();
}

// Release the block barrier when every live thread is at it, and each warp's
// barrier when every live lane of the warp is; false when nothing can move.
inline bool release() {
  Block& b = block();
  bool all_at_block = true;
  for (const Fiber& f : b.fibers) {
    if (!f.done) all_at_block = all_at_block && f.waiting == 1;
  }
  if (all_at_block) {
    for (Fiber& f : b.fibers) f.waiting = 0;
    return true;
  }
  bool released = false;
  for (unsigned w = 0; w * 32 < b.size; ++w) {
    bool all = true;
    for (unsigned t = w * 32; t < (w + 1) * 32 && t < b.size; ++t) {
      if (!b.fibers[t].done) all = all && b.fibers[t].waiting == 2;
    }
    if (all) {
      for (unsigned t = w * 32; t < (w + 1) * 32 && t < b.size; ++t) released |= b.fibers[t].waiting == 2;
      for (unsigned t = w * 32; t < (w + 1) * 32 && t < b.size; ++t) b.fibers[t].waiting = 0;
    }
  }
  return released;
}

template <typename F>
void launch(dim3 grid, dim3 threads, F&& kernel) {
  const std::function<void()> body(kernel);
  Block& b = block();
  b.size = threads.x;
  b.body = &body;
  while (b.fibers.size() < b.size) {
    b.fibers.emplace_back();
    start(b.fibers.back());
  }
  b.lanes.assign(b.size, 0);
  for (unsigned index = 0; index < grid.x; ++index) {
    b.index = index;
    for (unsigned t = 0; t < b.size; ++t) {
      b.fibers[t].done = false;
      b.fibers[t].waiting = 0;
    }
    for (unsigned round = 0;; ++round) {
      bool ran = false, live = false;
      for (unsigned k = 0; k < b.size; ++k) {
        const unsigned t = round % 2 ? b.size - 1 - k : k;  // both orders, so results cannot lean on one
        if (b.fibers[t].done) continue;
        live = true;
        if (b.fibers[t].waiting) continue;
        resume(t);
        ran = true;
      }
      if (!live) break;
      if (!ran && !release()) {
        std::fprintf(stderr, "cuda_emu: block %u of %u: a barrier that not every thread reaches\n", index, grid.x);
        std::abort();
      }
    }
  }
}

struct Index {
  unsigned x, y = 0, z = 0;
};

}  // namespace emu

#define threadIdx (::emu::Index{::emu::block().current})
#define blockIdx (::emu::Index{::emu::block().index})
#define blockDim (::emu::Index{::emu::block().size})

inline void __syncthreads() { emu::wait(1); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
  emu::Block& b = emu::block();
  const unsigned me = b.current;
  std::memcpy(&b.lanes[me], &value, sizeof(T));
  emu::wait(2);
  T out;
  std::memcpy(&out, &b.lanes[(me & ~31u) | ((me & 31u) ^ unsigned(lane_mask))], sizeof(T));
  emu::wait(2);  // every lane has read before any writes its next value
  return out;
}

// Launches are synchronous and cannot fail here.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
