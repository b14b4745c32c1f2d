// SPDX-License-Identifier: Apache-2.0
// A CPU emulation of the small CUDA subset that csrc/cuda/*.cu use, so that the
// C++ tests can run those files' kernels and launchers on a machine without a GPU
// (test_cuda_emu_*.cpp). What it checks is the CUDA code's own logic: launch
// geometry, indexing, grid-stride loops, shared-memory reductions, warp shuffles,
// the atomic and the deterministic (partials + fixed-order sum) paths. The
// per-element math compiles as host code here (no __CUDA_ARCH__), i.e. density.h's
// host branches, so device-only formulas (the .approx SFU instructions) are not
// what runs; those are covered by the GPU tests.
//
// Model: blocks run one after another; the threads of a block are coroutines
// (ucontext), resumed in a shuffled order every round, each running until it waits
// at a barrier: the block's
// (__syncthreads) or its warp's (__shfl_xor_sync's exchange). __shared__ variables
// become function statics: one copy per kernel instance, which is right because
// blocks never overlap. Grids must be small: this is for tests.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace emu {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}  // NOLINT
};

// The threads of a block are coroutines (ucontext) run round-robin by launch():
// a thread runs until it waits at a barrier, then yields. Cheap and deterministic
// (OS threads blocking on condition variables cost minutes of system time here).
struct Sched {
  ucontext_t main;
  std::vector<ucontext_t> ctxs;
  int current = 0;
};
inline thread_local Sched* sched = nullptr;

inline void yield() { swapcontext(&sched->ctxs[sched->current], &sched->main); }

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      return;
    }
    while (gen == gen_) yield();
  }

 private:
  int n_, count_ = 0, gen_ = 0;
};

struct Ctx {
  dim3 tid, bid, bdim, gdim;
  Barrier* block = nullptr;
  Barrier* warp = nullptr;
  uint32_t* wbuf = nullptr;  // the warp's 32 exchange slots
  int lane = 0;
};
inline Ctx ctx;                 // the running coroutine's (set by launch() at each switch)
inline std::vector<unsigned char> dynamic_smem;  // the running launch's dynamic shared memory
inline std::vector<Ctx> ctxs;   // every thread's of the running block

inline void syncthreads() { ctx.block->wait(); }

inline std::mt19937& rng() {
  static std::mt19937 g(12345);
  return g;
}

template <class T>
T shfl_xor(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  uint32_t* buf = ctx.wbuf;
  const int lane = ctx.lane;
  Barrier* warp = ctx.warp;
  buf[lane] = bits;
  warp->wait();
  const uint32_t got = buf[lane ^ lane_mask];
  warp->wait();  // nobody overwrites a slot before every lane has read
  T r;
  std::memcpy(&r, &got, 4);
  return r;
}

inline float atomic_add(float* p, float v) {  // coroutines never interleave inside this
  // (the order of a block's atomic adds follows the shuffled schedule, as on a GPU
  // it follows the hardware's)
  const float old = *p;
  *p = old + v;
  return old;
}

// kernel<<<grid, block, smem, stream>>>(args...) as launch(kernel, grid, block, smem, stream)(args...).
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_smem.data());
}

template <class K>
struct Launcher {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A... args) const {
    dynamic_smem.assign(smem + 16, 0xcd);  // garbage, as on a GPU
    const int nt = static_cast<int>(block.x * block.y * block.z);
    const int nw = (nt + 31) / 32;
    constexpr size_t kStack = 128 * 1024;
    std::vector<std::unique_ptr<char[]>> stacks;
    for (int t = 0; t < nt; ++t) stacks.emplace_back(new char[kStack]);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Barrier bb(nt);
          std::vector<std::unique_ptr<Barrier>> wb;
          for (int w = 0; w < nw; ++w) wb.emplace_back(new Barrier(std::min(32, nt - 32 * w)));
          std::vector<uint32_t> buf(static_cast<size_t>(nw) * 32);
          Sched s;
          s.ctxs.resize(nt);
          ctxs.assign(nt, Ctx{});
          std::vector<char> done(nt, 0);
          auto body = [&] {
            kernel(args...);
            done[s.current] = 1;
          };
          using Body = decltype(body);
          for (int t = 0; t < nt; ++t) {
            Ctx& c = ctxs[t];
            c.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            c.bid = dim3(bx, by, bz);
            c.bdim = block;
            c.gdim = grid;
            c.block = &bb;
            c.warp = wb[t / 32].get();
            c.wbuf = buf.data() + (t / 32) * 32;
            c.lane = t % 32;
            getcontext(&s.ctxs[t]);
            s.ctxs[t].uc_stack.ss_sp = stacks[t].get();
            s.ctxs[t].uc_stack.ss_size = kStack;
            s.ctxs[t].uc_link = &s.main;
            // makecontext passes int arguments: split the pointer to the body in two.
            const uintptr_t bp = reinterpret_cast<uintptr_t>(&body);
            makecontext(&s.ctxs[t], reinterpret_cast<void (*)()>(&entry<Body>), 2,
                        static_cast<unsigned>(bp & 0xffffffffu), static_cast<unsigned>(bp >> 32));
          }
          Sched* outer = sched;
          sched = &s;
          // Each round resumes the threads in a fresh pseudo-random order (fixed seed,
          // so runs repeat): a missing barrier shows up whichever side it is on.
          std::vector<int> order(nt);
          for (int t = 0; t < nt; ++t) order[t] = t;
          for (int left = nt; left > 0;) {
            left = 0;
            std::shuffle(order.begin(), order.end(), rng());
            for (int t : order) {
              if (done[t]) continue;
              s.current = t;
              ctx = ctxs[t];
              swapcontext(&s.main, &s.ctxs[t]);
              if (!done[t]) ++left;
            }
          }
          sched = outer;
        }
  }

  template <class Body>
  static void entry(unsigned lo, unsigned hi) {
    Body* b = reinterpret_cast<Body*>(static_cast<uintptr_t>(lo) | (static_cast<uintptr_t>(hi) << 32));
    (*b)();
  }
};

template <class K>
Launcher<K> launch(K kernel, dim3 grid, dim3 block, size_t smem, void* /*stream*/) {
  return Launcher<K>{kernel, grid, block, smem};
}

}  // namespace emu

// The CUDA names the kernels use.
using dim3 = emu::dim3;
using cudaStream_t = void*;
using cudaError_t = int;
constexpr int cudaSuccess = 0;
constexpr int cudaErrorInvalidValue = 1;
inline int cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return 0;
}
inline int cudaGetLastError() { return 0; }
inline float atomicAdd(float* p, float v) { return emu::atomic_add(p, v); }

#define CIFD_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (emu::ctx.tid)
#define blockIdx (emu::ctx.bid)
#define blockDim (emu::ctx.bdim)
#define gridDim (emu::ctx.gdim)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor(mask, v, o)
#define CIFD_LAUNCH(kernel, grid, block, smem, stream) emu::launch(kernel, grid, block, smem, stream)
#define CIFD_DYNAMIC_SHARED(type, name) type* name = emu::dynamic_shared<type>()
