// SPDX-License-Identifier: Apache-2.0
// Fused entropy bottleneck on the GPU over the math of cifd/density.h (the same
// per-element functions the CPU kernels run and csrc/tests/test_density.cpp checks).
//
// Forward: y viewed as [N, M], M = C*S; a block covers 128 columns of a row
// (grid-stride over rows), one thread per element, its channels' parameters in
// shared memory; the block's -ln p_b sum goes
// to a per-(column block, row) partial, summed in a fixed order by a second
// kernel (so the rate is deterministic; with one column block it is written
// directly).
//
// Groups (EbProblem::G, the RDM bank's channel): grid z is the group; each group
// gets the blocks one call on its block would, so the bits are the same.
//
// Backward: each thread keeps one channel for its whole grid-stride loop and
// accumulates that channel's 59 parameter gradients in registers. S == 1: a
// block is 32 channels x 8 row lanes, the channels' packed parameters in shared
// memory, reduced over the 8 lanes through shared memory. S > 1: a block is one
// channel, 256 threads over (n, s), reduced by warp shuffles. Block sums go to
// grad_packed with atomicAdd, or (deterministic) to per-block-row partials summed
// in a fixed order by a second kernel.
#ifndef CIFD_CUDA_EMULATION  // csrc/tests/cuda_emu.h runs this file on the CPU
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cifd/density.h"
#include "cifd/kernels.h"

namespace cifd {
namespace cuda {

namespace {

using namespace density;

constexpr int kThreads = 256;
constexpr int kFwdCols = 128;  // forward: columns (threads) per block
constexpr int kTileC = 32;  // channels per S == 1 backward block
constexpr int kTileN = 8;   // row lanes per S == 1 backward block
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ Scalars make_scalars(const EbProblem& pr) {
  return Scalars{pr.mode, static_cast<uint32_t>(pr.seed), static_cast<uint32_t>(pr.seed >> 32),
                 pr.rho, pr.s, pr.bound};
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------ forward
// y_hat = keep ? y + s*u : 0 | rne(y - m) + m | y;  p_b = max(p(y_hat), bound);
// rate[n] = sum over kept elements of -ln p_b, as per-(column block, row) partials.
// The block's channels' parameters sit in shared memory (read from global they
// were hoisted into registers: 255 registers and spills).
template <class D, int MODE>
__global__ void __launch_bounds__(kFwdCols)
    entropy_bottleneck_fwd_kernel(const EbProblem pr, const typename D::T* __restrict__ y,
                                  const float* __restrict__ packed,
                                  const float* __restrict__ med, typename D::T* __restrict__ yhat,
                                  float* __restrict__ rate_out, float* __restrict__ lik) {
  __shared__ float sp[kNumPacked * kFwdCols];
  __shared__ float red[kFwdCols / 32];
  const int64_t M = pr.C * pr.S, S = pr.S;
  const int64_t grp = blockIdx.z, CT = pr.G * pr.C;  // group; packed's row stride
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kFwdCols;
  const int64_t j = j0 + threadIdx.x;
  const int64_t cfirst = j0 / S;
  const int64_t jend = M < j0 + kFwdCols ? M : j0 + kFwdCols;
  const int64_t ncols = (jend - 1) / S - cfirst + 1;  // channels of this block, <= kFwdCols
  for (int k = threadIdx.x; k < kNumPacked * kFwdCols; k += kFwdCols) {
    const int cc = k % kFwdCols;
    sp[k] = cc < ncols ? packed[(k / kFwdCols) * CT + grp * pr.C + cfirst + cc] : 0.0f;
  }
  __syncthreads();
  Scalars sc = make_scalars(pr);
  sc.mode = MODE;
  const bool active = j < M;
  const int64_t c = active ? j / S : cfirst;
  const float m = MODE == kDequantize && active ? med[grp * pr.C + c] : 0.0f;
  const float* p = sp + (c - cfirst);
  for (int64_t n = blockIdx.y; n < pr.N; n += gridDim.y) {
    float nll = 0.0f;
    if (active) {
      const int64_t i = (grp * pr.N + n) * M + j;
      const uint64_t ctr = pr.offset + static_cast<uint64_t>(i);
      float yh, pb;
      nll = element_forward(sc, D::load(y[i]), m, static_cast<uint32_t>(ctr),
                            static_cast<uint32_t>(ctr >> 32), p, kFwdCols, &yh, &pb);
      yhat[i] = D::store(yh);
      if (lik != nullptr) lik[i] = pb;
    }
    nll = warp_sum(nll);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = nll;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < kFwdCols / 32; ++w) t += red[w];
      rate_out[static_cast<int64_t>(blockIdx.x) * (pr.G * pr.N) + grp * pr.N + n] = t;
    }
    __syncthreads();
  }
}

// rate[n] = sum over column blocks b of part[b * N + n], b in order.
__global__ void rate_reduce_kernel(const float* __restrict__ part, float* __restrict__ rate,
                                   int64_t N, int64_t blocks) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float t = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) t += part[b * N + n];
    rate[n] = t;
  }
}

// ------------------------------------------------------------------ backward
// dL/dp_b = g_lik + keep (-g_rate[n] / p_b); LowerBound; d p / d logits; back
// through the MLP for both logits (density.h). dy = keep (g_yhat + dL/dy_hat) |
// 0 (medians take the sum) | the sum. Parameter gradients: registers, then blocks.

// Block result of parameter row r for parameter column c (of C): atomically added
// to grad_packed, or stored as the partial of block row `part_row`.
__device__ __forceinline__ void emit(float* out, bool deterministic, int64_t part_row, int r,
                                     int64_t C, int64_t c, float v) {
  if (deterministic) {
    out[(part_row * kNumGrad + r) * C + c] = v;
  } else {
    atomicAdd(out + r * C + c, v);
  }
}

// MINB: __launch_bounds__'s minimum blocks per SM. 1 (the default) lets ptxas use
// ~195 registers (one 256-thread block an SM); 2 caps them at 128 (two blocks, with
// ~50 spill stores and loads an element): the EbProblem::cuda_bwd_min_blocks = 2
// experiment (float32 only), for a GPU to time.
template <class D, int MODE, int MINB>
__global__ void __launch_bounds__(kTileC* kTileN, MINB)
    entropy_bottleneck_bwd_rows_kernel(const EbProblem pr, const typename D::T* __restrict__ y,
                                       const float* __restrict__ packed,
                                       const float* __restrict__ med,
                                       const typename D::T* __restrict__ gyh,
                                       const float* __restrict__ grate,
                                       const float* __restrict__ glik,
                                       typename D::T* __restrict__ gy, float* __restrict__ out,
                                       bool deterministic) {
  __shared__ float sp[kNumPacked * kTileC];
  __shared__ float red[kTileN][kTileC + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t C = pr.C;
  const int64_t grp = blockIdx.z, CT = pr.G * C, gc = grp * C;  // group, packed's row stride, its columns
  const int64_t cbase = static_cast<int64_t>(blockIdx.x) * kTileC;
  for (int k = ty * kTileC + tx; k < kNumPacked * kTileC; k += kTileC * kTileN) {
    const int64_t cc = cbase + (k % kTileC);
    sp[k] = cc < C ? packed[(k / kTileC) * CT + gc + cc] : 0.0f;
  }
  __syncthreads();
  Scalars sc = make_scalars(pr);
  sc.mode = MODE;
  const int64_t c = cbase + tx;
  float acc[kNumGrad];
#pragma unroll
  for (int r = 0; r < kNumGrad; ++r) acc[r] = 0.0f;
  if (c < C) {
    const float m = MODE == kDequantize ? med[gc + c] : 0.0f;
    for (int64_t n = static_cast<int64_t>(blockIdx.y) * kTileN + ty; n < pr.N;
         n += static_cast<int64_t>(gridDim.y) * kTileN) {
      const int64_t i = (grp * pr.N + n) * C + c;
      const uint64_t ctr = pr.offset + static_cast<uint64_t>(i);
      const float g = element_backward(
          sc, D::load(y[i]), m, static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
          gyh != nullptr ? D::load(gyh[i]) : 0.0f, glik != nullptr ? glik[i] : 0.0f,
          grate != nullptr ? grate[grp * pr.N + n] : 0.0f, sp + tx, kTileC, acc, 1);
      gy[i] = D::store(g);
    }
  }
#pragma unroll
  for (int r = 0; r < kNumGrad; ++r) {
    red[ty][tx] = acc[r];
    __syncthreads();
    if (ty == 0 && c < C) {
      float t = 0.0f;
#pragma unroll
      for (int k = 0; k < kTileN; ++k) t += red[k][tx];
      emit(out, deterministic, blockIdx.y, r, CT, gc + c, t);
    }
    __syncthreads();
  }
}

template <class D, int MODE, int MINB>
__global__ void __launch_bounds__(kThreads, MINB)
    entropy_bottleneck_bwd_spatial_kernel(const EbProblem pr, const typename D::T* __restrict__ y,
                                          const float* __restrict__ packed,
                                          const float* __restrict__ med,
                                          const typename D::T* __restrict__ gyh,
                                          const float* __restrict__ grate,
                                          const float* __restrict__ glik,
                                          typename D::T* __restrict__ gy,
                                          float* __restrict__ out, bool deterministic) {
  __shared__ float sp[kNumPacked];
  __shared__ float red[kThreads / 32][kNumGrad];
  const int64_t C = pr.C, S = pr.S, c = blockIdx.x;
  const int64_t grp = blockIdx.z, CT = pr.G * C, gc = grp * C;  // group, packed's row stride, its columns
  if (threadIdx.x < kNumPacked) sp[threadIdx.x] = packed[threadIdx.x * CT + gc + c];
  __syncthreads();
  Scalars sc = make_scalars(pr);
  sc.mode = MODE;
  const float m = MODE == kDequantize ? med[gc + c] : 0.0f;
  float acc[kNumGrad];
#pragma unroll
  for (int r = 0; r < kNumGrad; ++r) acc[r] = 0.0f;
  const int64_t total = pr.N * S;
  for (int64_t jj = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; jj < total;
       jj += static_cast<int64_t>(gridDim.y) * kThreads) {
    const int64_t n = jj / S;
    const int64_t i = ((grp * pr.N + n) * C + c) * S + (jj - n * S);
    const uint64_t ctr = pr.offset + static_cast<uint64_t>(i);
    const float g = element_backward(
        sc, D::load(y[i]), m, static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32),
        gyh != nullptr ? D::load(gyh[i]) : 0.0f, glik != nullptr ? glik[i] : 0.0f,
        grate != nullptr ? grate[grp * pr.N + n] : 0.0f, sp, 1, acc, 1);
    gy[i] = D::store(g);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kNumGrad; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < kNumGrad) {
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) t += red[w][threadIdx.x];
    emit(out, deterministic, blockIdx.y, threadIdx.x, CT, gc + c, t);
  }
}

// grad[r, c] = sum over block rows g of part[g, r, c], g in order.
__global__ void grad_reduce_kernel(const float* __restrict__ part, float* __restrict__ grad,
                                   int64_t n, int64_t parts) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float t = 0.0f;
    for (int64_t g = 0; g < parts; ++g) t += part[g * n + k];
    grad[k] = t;
  }
}

// ------------------------------------------------------------------ launch geometry
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_1d(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(cdiv(n, kThreads), 4096)));
}

struct FwdGeom {
  int64_t col_blocks, rows;
};
FwdGeom fwd_geom(const EbProblem& pr, int num_sms) {
  const int64_t cb = cdiv(pr.C * pr.S, kFwdCols);
  const int64_t want = std::max<int64_t>(1, cdiv(8LL * std::max(num_sms, 1), cb));
  return {cb, std::max<int64_t>(1, std::min<int64_t>({pr.N, want, kMaxGridY}))};
}

struct BwdGeom {
  bool rows;  // S == 1 kernel
  int64_t gx, gy;
};
BwdGeom bwd_geom(const EbProblem& pr, int num_sms) {
  const int64_t target = 4LL * std::max(num_sms, 1);
  if (pr.S == 1) {
    const int64_t gx = cdiv(pr.C, kTileC);
    const int64_t gy = std::min<int64_t>({cdiv(target, gx), cdiv(pr.N, kTileN), kMaxGridY});
    return {true, gx, std::max<int64_t>(1, gy)};
  }
  const int64_t gy = std::min<int64_t>({cdiv(target, pr.C), cdiv(pr.N * pr.S, kThreads), kMaxGridY});
  return {false, pr.C, std::max<int64_t>(1, gy)};
}

bool empty_problem(const EbProblem& pr) { return pr.N <= 0 || pr.C <= 0 || pr.S <= 0 || pr.G <= 0; }

template <class D, int MODE>
void launch_fwd(const EbProblem& pr, const void* y, const float* packed, const float* med,
                void* yhat, float* rate, float* lik, float* work, int num_sms, cudaStream_t st) {
  using T = typename D::T;
  const FwdGeom g = fwd_geom(pr, num_sms);
  float* out = g.col_blocks > 1 ? work : rate;
  const auto fwd = entropy_bottleneck_fwd_kernel<D, MODE>;
  const dim3 grid(static_cast<unsigned>(g.col_blocks), static_cast<unsigned>(g.rows),
                  static_cast<unsigned>(pr.G));
  CIFD_LAUNCH(fwd, grid, kFwdCols, 0, st)(pr, static_cast<const T*>(y), packed, med,
                                          static_cast<T*>(yhat), out, lik);
  if (g.col_blocks > 1)
    CIFD_LAUNCH(rate_reduce_kernel, grid_1d(pr.G * pr.N), kThreads, 0, st)(work, rate, pr.G * pr.N,
                                                                          g.col_blocks);
}

template <class D, int MODE, int MINB>
void launch_bwd_kernel(const BwdGeom& g, const EbProblem& pr, const void* y, const float* packed,
                       const float* med, const void* gyh, const float* grate, const float* glik,
                       void* gy, float* out, bool deterministic, cudaStream_t st) {
  using T = typename D::T;
  const dim3 grid(static_cast<unsigned>(g.gx), static_cast<unsigned>(g.gy), static_cast<unsigned>(pr.G));
  if (g.rows) {
    const auto bwd = entropy_bottleneck_bwd_rows_kernel<D, MODE, MINB>;
    CIFD_LAUNCH(bwd, grid, dim3(kTileC, kTileN), 0, st)(
        pr, static_cast<const T*>(y), packed, med, static_cast<const T*>(gyh), grate, glik,
        static_cast<T*>(gy), out, deterministic);
  } else {
    const auto bwd = entropy_bottleneck_bwd_spatial_kernel<D, MODE, MINB>;
    CIFD_LAUNCH(bwd, grid, kThreads, 0, st)(
        pr, static_cast<const T*>(y), packed, med, static_cast<const T*>(gyh), grate, glik,
        static_cast<T*>(gy), out, deterministic);
  }
}

template <class D, int MODE>
void launch_bwd(const EbProblem& pr, const void* y, const float* packed, const float* med,
                const void* gyh, const float* grate, const float* glik, void* gy, float* grad,
                bool deterministic, float* work, int num_sms, cudaStream_t st) {
  const BwdGeom g = bwd_geom(pr, num_sms);
  float* out = deterministic ? work : grad;
  if (!deterministic) cudaMemsetAsync(grad, 0, sizeof(float) * kNumGrad * pr.G * pr.C, st);
  bool two = false;
  if constexpr (std::is_same<D, F32>::value) two = pr.cuda_bwd_min_blocks == 2;  // see MINB above
  if constexpr (std::is_same<D, F32>::value) {
    if (two) {
      launch_bwd_kernel<D, MODE, 2>(g, pr, y, packed, med, gyh, grate, glik, gy, out, deterministic, st);
    }
  }
  if (!two)
    launch_bwd_kernel<D, MODE, 1>(g, pr, y, packed, med, gyh, grate, glik, gy, out, deterministic, st);
  if (deterministic)
    CIFD_LAUNCH(grad_reduce_kernel, grid_1d(kNumGrad * pr.G * pr.C), kThreads, 0, st)(
        work, grad, kNumGrad * pr.G * pr.C, g.gy);
}

template <class D, class F>
void by_mode(int mode, F&& f) {
  switch (mode) {
    case kNoise: f(std::integral_constant<int, kNoise>{}); break;
    case kDequantize: f(std::integral_constant<int, kDequantize>{}); break;
    default: f(std::integral_constant<int, kNone>{}); break;
  }
}

}  // namespace

int64_t entropy_bottleneck_fwd_workspace(const EbProblem& pr, int num_sms) {
  if (empty_problem(pr)) return 0;
  const FwdGeom g = fwd_geom(pr, num_sms);
  return g.col_blocks > 1 ? g.col_blocks * pr.G * pr.N : 0;
}

int64_t entropy_bottleneck_bwd_workspace(const EbProblem& pr, bool deterministic, int num_sms) {
  if (empty_problem(pr) || !deterministic) return 0;
  return bwd_geom(pr, num_sms).gy * kNumGrad * pr.G * pr.C;
}

int entropy_bottleneck_fwd(const EbProblem& pr, const void* y, const float* packed,
                           const float* medians, void* y_hat, float* rate, float* likelihood,
                           float* workspace, int num_sms, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (pr.N <= 0) return cudaSuccess;
  if (empty_problem(pr)) return static_cast<int>(cudaMemsetAsync(rate, 0, sizeof(float) * pr.G * pr.N, st));
  by_dtype(pr.dtype, [&](auto d) {
    using D = decltype(d);
    by_mode<D>(pr.mode, [&](auto m) {
      launch_fwd<D, decltype(m)::value>(pr, y, packed, medians, y_hat, rate, likelihood, workspace,
                                        num_sms, st);
    });
  });
  return static_cast<int>(cudaGetLastError());
}

int entropy_bottleneck_bwd(const EbProblem& pr, const void* y, const float* packed,
                           const float* medians, const void* grad_y_hat, const float* grad_rate,
                           const float* grad_likelihood, void* grad_y, float* grad_packed,
                           bool deterministic, float* workspace, int num_sms, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (pr.C <= 0) return cudaSuccess;
  if (empty_problem(pr))
    return static_cast<int>(cudaMemsetAsync(grad_packed, 0, sizeof(float) * kNumGrad * pr.G * pr.C, st));
  by_dtype(pr.dtype, [&](auto d) {
    using D = decltype(d);
    by_mode<D>(pr.mode, [&](auto m) {
      launch_bwd<D, decltype(m)::value>(pr, y, packed, medians, grad_y_hat, grad_rate,
                                        grad_likelihood, grad_y, grad_packed, deterministic,
                                        workspace, num_sms, st);
    });
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cifd
