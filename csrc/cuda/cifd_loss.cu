// SPDX-License-Identifier: Apache-2.0
// Fused stage-2 CIFD loss on the GPU over the math of cifd/losses.h (the same
// per-element functions the CPU kernel runs and csrc/tests/test_losses.cpp checks).
//
// One block per sample (grid-stride over the G B student rows; with groups row
// r = g B + b reads target row b, kernels.h), its threads strided over K (and
// D), so every global access is coalesced whatever K is. Per row:
//   sweep 1  student z and targets 0..kGroup-1: online log-sum-exp of z, z / tau
//            and each kept t_m / tau (one exp per value), merged over the block;
//   sweep 2  probabilities, the KL summands of targets 0..kGroup-1 and the logits
//            gradient, written once;
//   sweep 3  over D: the distortions of targets 0..kGroup-1 and the embedding
//            gradient, written once.
// A thread keeps per-target partials for kGroup targets in registers; targets
// kGroup.. (M > kGroup, rare: M = N + 1 is 2..6 in the paper) take extra sweeps
// for their log-sum-exp, KL and distortion, while the gradient sweeps read them in a
// runtime loop (per-target scalars in shared memory). A row's targets are re-read
// in sweep 2 from L2 (a row of M + 1 targets is (M + 1) K elements; at M = 4,
// K = 1000 all rows of a B = 1024 batch fit in an H100's L2).
//
// Determinism: no atomics. Block sums are warp butterflies (__shfl_xor_sync) then
// warps in index order; every thread computes the same total. Per-row terms go
// to ce [G, B], kl [M, G, B], emb [M, G, B]; the batch sums are the caller's (torch's
// fixed-order reductions). The launch shape depends on K and D only, so a row's
// bits depend on nothing but that row and (K, D).
//
// Dropped targets (keep 0) are never read. Labels: each row's thread 0 asserts on
// the device that its label is a class in [0, K) or ignore_index (losses::label_ok),
// as torch's CUDA losses do (CUDA_KERNEL_ASSERT in nll_loss): no host sync, and the
// launch's stream reports cudaErrorAssert ("device-side assert triggered") at its
// next synchronisation; as after any device assert, the CUDA context is then
// unusable. The math never indexes with such a label (z_y = 0, no one-hot), so the
// rows that run before the assert stops the grid stay in bounds.
#ifndef CIFD_CUDA_EMULATION  // csrc/tests/cuda_emu.h runs this file on the CPU
#include <cuda_runtime.h>
#endif

// CIFD_DEVICE_ASSERT(cond, msg): torch's CUDA_KERNEL_ASSERT_MSG without torch: unlike
// assert(), on whatever NDEBUG says (a Release build may define it). nvcc declares
// __assert_fail for device code (crt/common_functions.h). The C++ tests define it
// first to count failures under the emulation (csrc/tests/test_cuda_emu_loss.cpp).
#ifndef CIFD_DEVICE_ASSERT
#define CIFD_DEVICE_ASSERT(cond, msg)                                                   \
  do {                                                                                  \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#endif

#include <cstdint>

#include "cifd/density.h"
#include "cifd/kernels.h"
#include "cifd/losses.h"

namespace cifd {
namespace cuda {

namespace {

using density::BF16;
using density::by_dtype;
using density::exp_f;
using density::F16;
using density::F32;
using losses::OnlineLse;

constexpr int kMaxThreads = 512;  // __launch_bounds__: up to 128 registers a thread
constexpr int kMinThreads = 32;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kGroup = 8;  // targets whose per-row partials one sweep keeps in registers
constexpr int kRedWidth = 2 * (kGroup + 2);  // floats one warp puts into a block reduction
constexpr int kElemsPerThread = 8;  // aim: a thread covers ~8 columns of K (or D)
constexpr int64_t kMaxGrid = 1 << 20;

// Everything a block needs, passed by value (under 200 bytes of kernel parameters).
struct Args {
  CifdLossProblem pr;
  const void* logits;       // [G, B, K]
  const void* targets;      // [M, B, K]
  const int64_t* labels;    // [B]
  const void* emb;          // [G, B, D] or null (D = 0)
  const void* target_embs;  // [M, B, D] or null
  const float* lam;         // [M]
  const uint8_t* keep;      // [M]
  const float* nvalid;      // [1]
  const float* group_w;     // [G] or null
  float* ce;                // [G, B]
  float* kl;                // [M, G, B]
  float* emb_terms;         // [M, G, B]
  void* grad_logits;        // [G, B, K]
  void* grad_emb;           // [G, B, D]
};

// Student row r = g B + b is scored against target row b (kernels.h, groups).
__device__ __forceinline__ int64_t rows_of(const CifdLossProblem& pr) { return pr.G * pr.B; }

// Per-target scalars in dynamic shared memory (3 M floats) plus the block-wide
// constants every thread derives identically.
struct Block {
  const float* w;     // w_m = lam_m k_m
  const float* kept;  // k_m as 0/1
  float* lse;         // lse_m of t_m / tau, for the row being processed
  float w_sum, inv_tau, tau2, c_ce_all;
  float* red;         // [kMaxWarps * kRedWidth] static shared scratch
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ OnlineLse warp_lse(OnlineLse a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const OnlineLse b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    a = losses::lse_merge(a, b);
  }
  return a;
}

// v[i] <- the block's sum of v[i] for the i in `active` (a block-uniform bit mask:
// others are left as they are), the same bits in every thread. The leading
// barrier keeps a previous reduction's readers of `red` ahead of this one's writers.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], uint32_t active, float* red) {
  static_assert(N <= kRedWidth && N <= 32, "block_sum: too many values for the scratch");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (active & (1u << i)) v[i] = warp_sum(v[i]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[warp * kRedWidth + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (!(active & (1u << i))) continue;
    float t = 0.0f;
    for (int w = 0; w < nwarps; ++w) t += red[w * kRedWidth + i];
    v[i] = t;
  }
}

// a[i] <- the block's merge of a[i] for the i in `active` (as block_sum).
template <int N>
__device__ __forceinline__ void block_lse(OnlineLse (&a)[N], uint32_t active, float* red) {
  static_assert(2 * N <= kRedWidth && N <= 32, "block_lse: too many values for the scratch");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (active & (1u << i)) a[i] = warp_lse(a[i]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      red[warp * kRedWidth + 2 * i] = a[i].m;
      red[warp * kRedWidth + 2 * i + 1] = a[i].s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (!(active & (1u << i))) continue;
    OnlineLse t = losses::lse_empty();
    for (int w = 0; w < nwarps; ++w)
      t = losses::lse_merge(t, OnlineLse{red[w * kRedWidth + 2 * i], red[w * kRedWidth + 2 * i + 1]});
    a[i] = t;
  }
}

// Keep bits of targets g0 .. g0 + kGroup - 1 (bit g: target g0 + g exists and is kept).
__device__ __forceinline__ uint32_t group_mask(const Block& bk, int64_t M, int64_t g0) {
  uint32_t mask = 0u;
#pragma unroll
  for (int g = 0; g < kGroup; ++g)
    if (g0 + g < M && bk.kept[g0 + g] != 0.0f) mask |= 1u << g;
  return mask;
}

// ------------------------------------------------------------------ logits
// lse of t_m / tau for the kept targets m in [g0, g0 + kGroup), into bk.lse; with
// STUDENT (g0 = 0) also lse(z) and lse(z / tau).
template <class EL, bool STUDENT>
__device__ __forceinline__ void lse_sweep(const Args& a, const Block& bk, int64_t r, int64_t b,
                                          int64_t g0, float* lse_1, float* lse_s) {
  using T = typename EL::T;
  const int64_t B = a.pr.B, K = a.pr.K, M = a.pr.M;
  const T* z = static_cast<const T*>(a.logits) + r * K;
  const T* t0 = static_cast<const T*>(a.targets) + (g0 * B + b) * K;  // target g0's row
  const int64_t tstride = B * K;                                      // to the next target
  const uint32_t mask = group_mask(bk, M, g0);
  OnlineLse acc[kGroup + 2];
#pragma unroll
  for (int i = 0; i < kGroup + 2; ++i) acc[i] = losses::lse_empty();
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    if (STUDENT) {
      const float zj = EL::load(z[j]);
      acc[kGroup] = losses::lse_push(acc[kGroup], zj);
      acc[kGroup + 1] = losses::lse_push(acc[kGroup + 1], zj * bk.inv_tau);
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
      if (mask & (1u << g)) acc[g] = losses::lse_push(acc[g], EL::load(t0[g * tstride + j]) * bk.inv_tau);
  }
  block_lse(acc, mask | (STUDENT ? 3u << kGroup : 0u), bk.red);
  if (STUDENT) {
    *lse_1 = losses::lse_value(acc[kGroup]);
    *lse_s = losses::lse_value(acc[kGroup + 1]);
  }
  if (threadIdx.x == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
      if (mask & (1u << g)) bk.lse[g0 + g] = losses::lse_value(acc[g]);
  }
}

// Sweep 2 (GRAD, g0 = 0): the logits gradient for all M targets and the KL sums of
// targets [0, kGroup). Otherwise (g0 >= kGroup) only the KL sums of [g0, g0 + kGroup).
// Writes kl[m, r] = tau^2 KL (0 for a dropped target) for the group.
template <class EL, bool GRAD>
__device__ __forceinline__ void kl_sweep(const Args& a, const Block& bk, int64_t r, int64_t b,
                                         int64_t g0, float lse_1, float lse_s, int64_t label,
                                         bool counts, bool in_range) {
  using T = typename EL::T;
  const CifdLossProblem& pr = a.pr;
  const int64_t B = pr.B, K = pr.K, M = pr.M, R = rows_of(pr);
  const T* z = static_cast<const T*>(a.logits) + r * K;
  const T* t0 = static_cast<const T*>(a.targets) + (g0 * B + b) * K;
  const int64_t tstride = B * K;
  const uint32_t mask = group_mask(bk, M, g0);
  float lse_t[kGroup], w[kGroup], kl[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    lse_t[g] = (mask & (1u << g)) ? bk.lse[g0 + g] : 0.0f;
    w[g] = (mask & (1u << g)) ? bk.w[g0 + g] : 0.0f;
    kl[g] = 0.0f;
  }
  const float c_ce = counts ? bk.c_ce_all : 0.0f;
  T* gz = static_cast<T*>(a.grad_logits) + r * K;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const float zj = EL::load(z[j]);
    const float lp_s = zj * bk.inv_tau - lse_s;
    float wp = 0.0f;  // sum_m w_m p_mj, m ascending (the CPU's order)
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (mask & (1u << g)) {
        const float lp_t = EL::load(t0[g * tstride + j]) * bk.inv_tau - lse_t[g];
        const float p_t = exp_f(lp_t);
        kl[g] += losses::kl_term(p_t, lp_t, lp_s);
        if (GRAD) wp += w[g] * p_t;
      }
    }
    if (GRAD) {
      for (int64_t m = kGroup; m < M; ++m) {  // the targets past the register group
        if (bk.kept[m] != 0.0f) {
          const float lp_t = EL::load(t0[m * tstride + j]) * bk.inv_tau - bk.lse[m];
          wp += bk.w[m] * exp_f(lp_t);
        }
      }
      float g = losses::logit_grad(exp_f(zj - lse_1), exp_f(lp_s), wp, c_ce, pr.c_kl, bk.w_sum);
      if (in_range && j == label) g -= c_ce;
      gz[j] = EL::store(g);
    }
  }
  block_sum(kl, mask, bk.red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
      if (g0 + g < M) a.kl[(g0 + g) * R + r] = (mask & (1u << g)) ? bk.tau2 * kl[g] : 0.0f;
  }
}

// ------------------------------------------------------------------ embeddings
// GRAD (g0 = 0): the embedding gradient for all M targets and the distortions of
// targets [0, kGroup); otherwise only the distortions of [g0, g0 + kGroup).
template <class EE, bool GRAD>
__device__ __forceinline__ void emb_sweep(const Args& a, const Block& bk, int64_t r, int64_t b,
                                          int64_t g0) {
  using T = typename EE::T;
  const CifdLossProblem& pr = a.pr;
  const int64_t B = pr.B, D = pr.D, M = pr.M, R = rows_of(pr);
  const int kind = pr.dist;
  const float c_emb = a.group_w ? pr.c_emb * a.group_w[r / B] : pr.c_emb;
  const T* u = static_cast<const T*>(a.emb) + r * D;
  const T* x0 = static_cast<const T*>(a.target_embs) + (g0 * B + b) * D;
  const int64_t xstride = B * D;
  const uint32_t mask = group_mask(bk, M, g0);
  float w[kGroup], e[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    w[g] = (mask & (1u << g)) ? bk.w[g0 + g] : 0.0f;
    e[g] = 0.0f;
  }
  T* gu = static_cast<T*>(a.grad_emb) + r * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float ud = EE::load(u[d]);
    float acc = 0.0f;  // sum_m w_m e'(u - x_m), m ascending
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (mask & (1u << g)) {
        const float diff = ud - EE::load(x0[g * xstride + d]);
        e[g] += losses::dist_value(diff, kind);
        if (GRAD) acc += w[g] * losses::dist_grad(diff, kind);
      }
    }
    if (GRAD) {
      for (int64_t m = kGroup; m < M; ++m)  // the targets past the register group
        if (bk.kept[m] != 0.0f) acc += bk.w[m] * losses::dist_grad(ud - EE::load(x0[m * xstride + d]), kind);
      gu[d] = EE::store(acc * c_emb);
    }
  }
  block_sum(e, mask, bk.red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
      if (g0 + g < M) a.emb_terms[(g0 + g) * R + r] = (mask & (1u << g)) ? e[g] : 0.0f;
  }
}

// ------------------------------------------------------------------ the kernel
// Dynamic shared memory: 3 M floats (w, kept, lse). blockDim.x: a multiple of 32,
// at most kMaxThreads.
template <class EL, class EE>
__global__ void __launch_bounds__(kMaxThreads) cifd_loss_fwd_kernel(const Args a) {
  CIFD_DYNAMIC_SHARED(float, dyn);
  __shared__ float red[kMaxWarps * kRedWidth];
  const CifdLossProblem& pr = a.pr;
  const int64_t B = pr.B, K = pr.K, M = pr.M;
  float* w = dyn;
  float* kept = dyn + M;
  float* lse = dyn + 2 * M;
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x) {
    const bool k = a.keep[m] != 0;
    kept[m] = k ? 1.0f : 0.0f;
    w[m] = losses::target_weight(k, a.lam[m]);
  }
  __syncthreads();
  Block bk;
  bk.w = w;
  bk.kept = kept;
  bk.lse = lse;
  bk.red = red;
  bk.w_sum = 0.0f;
  for (int64_t m = 0; m < M; ++m) bk.w_sum += w[m];  // m ascending, as on the CPU
  bk.inv_tau = 1.0f / pr.tau;
  bk.tau2 = pr.tau * pr.tau;
  bk.c_ce_all = pr.lam_ce / a.nvalid[0];

  const int64_t R = rows_of(pr);
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t b = r % B;
    const int64_t label = a.labels[b];
    if (threadIdx.x == 0)
      CIFD_DEVICE_ASSERT(losses::label_ok(label, K, pr.ignore_index),
                         "cifd_loss: labels must be in [0, K) or ignore_index");
    const bool counts = losses::label_counts(label, pr.ignore_index);
    const bool in_range = losses::label_in_range(label, K, pr.ignore_index);
    float lse_1, lse_s;
    // Every thread is past the previous row (the barrier closing the loop), so
    // thread 0 may overwrite bk.lse here.
    lse_sweep<EL, true>(a, bk, r, b, 0, &lse_1, &lse_s);
    for (int64_t g0 = kGroup; g0 < M; g0 += kGroup)
      lse_sweep<EL, false>(a, bk, r, b, g0, nullptr, nullptr);
    __syncthreads();  // bk.lse (written by thread 0) visible to all
    if (threadIdx.x == 0) {
      using TL = typename EL::T;
      const float z_y = in_range ? EL::load(static_cast<const TL*>(a.logits)[r * K + label]) : 0.0f;
      a.ce[r] = losses::ce_value(lse_1, z_y, counts, in_range);
    }
    kl_sweep<EL, true>(a, bk, r, b, 0, lse_1, lse_s, label, counts, in_range);
    for (int64_t g0 = kGroup; g0 < M; g0 += kGroup)
      kl_sweep<EL, false>(a, bk, r, b, g0, lse_1, lse_s, label, counts, in_range);
    if (pr.D > 0) {
      emb_sweep<EE, true>(a, bk, r, b, 0);
      for (int64_t g0 = kGroup; g0 < M; g0 += kGroup) emb_sweep<EE, false>(a, bk, r, b, g0);
    }
    __syncthreads();  // all reads of bk.lse and red done before the next row writes them
  }
}

// Threads per row: a power of two in [32, 512], ~kElemsPerThread columns of the
// longer of K and D per thread.
int pick_threads(int64_t K, int64_t D) {
  const int64_t n = K > D ? K : D;
  int t = kMinThreads;
  while (t < kMaxThreads && static_cast<int64_t>(t) * kElemsPerThread < n) t *= 2;
  return t;
}

}  // namespace

int cifd_loss_fwd(const CifdLossProblem& pr, const void* logits, const void* targets,
                  const int64_t* labels, const void* emb, const void* target_embs, const float* lam,
                  const uint8_t* keep, const float* nvalid, const float* group_w, float* ce,
                  float* kl, float* emb_terms, void* grad_logits, void* grad_emb, void* stream) {
  if (pr.B <= 0 || pr.G <= 0) return cudaSuccess;
  if (pr.M < 1 || pr.M > kCifdLossMaxTargets || pr.K < 0 || pr.D < 0 ||
      (pr.D > 0 && (emb == nullptr || target_embs == nullptr || grad_emb == nullptr)))
    return cudaErrorInvalidValue;
  const Args a{pr,     logits, targets, labels,    emb,         target_embs, lam,     keep,
               nvalid, group_w, ce,     kl,        emb_terms,   grad_logits, grad_emb};
  const int threads = pick_threads(pr.K, pr.D);
  const int64_t rows = pr.G * pr.B;
  const unsigned grid = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
  const size_t smem = sizeof(float) * 3 * static_cast<size_t>(pr.M);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  by_dtype(pr.logits_dtype, [&](auto l) {
    by_dtype(pr.emb_dtype, [&](auto e) {
      const auto kernel = cifd_loss_fwd_kernel<decltype(l), decltype(e)>;
      CIFD_LAUNCH(kernel, grid, threads, smem, st)(a);
    });
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cifd
