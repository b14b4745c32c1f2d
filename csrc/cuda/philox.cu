// SPDX-License-Identifier: Apache-2.0
// Philox uniforms and keep masks on the GPU: one thread per element (each
// Philox call yields the four words of one counter; the contract gives each
// element its own counter).
#ifndef CIFD_CUDA_EMULATION  // csrc/tests/cuda_emu.h runs this file on the CPU
#include <cuda_runtime.h>
#endif

#include "cifd/kernels.h"
#include "cifd/philox.h"

namespace cifd {
namespace cuda {

namespace {
constexpr int kThreads = 256;

__global__ void philox_uniform_kernel(float* __restrict__ out, int64_t n, uint64_t seed,
                                      uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = uint_to_uniform(philox(seed, offset + static_cast<uint64_t>(i)).w[0]);
  }
}

__global__ void philox_keep_mask_kernel(uint8_t* __restrict__ out, int64_t n, uint64_t seed,
                                        uint64_t offset, float rho) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = uint_to_uniform(philox(seed, offset + static_cast<uint64_t>(i)).w[1]) >= rho;
  }
}

unsigned grid_for(int64_t n) {
  // Grid-stride loop: enough blocks to fill any current GPU, capped for huge n.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}
}  // namespace

int philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  if (n <= 0) return cudaSuccess;
  CIFD_LAUNCH(philox_uniform_kernel, grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream))(
      out, n, seed, offset);
  return static_cast<int>(cudaGetLastError());
}

int philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                     void* stream) {
  if (n <= 0) return cudaSuccess;
  CIFD_LAUNCH(philox_keep_mask_kernel, grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream))(
      out, n, seed, offset, rho);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace cifd
