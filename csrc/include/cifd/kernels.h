// SPDX-License-Identifier: Apache-2.0
// Raw kernel entry points: raw pointers, int64 sizes, no torch. The binding
// layer (python/) checks arguments and calls these.
#pragma once
#include <cstdint>

namespace cifd {
namespace cpu {

// out[i] = uniform(word 0 of philox(seed, offset + i)), i in [0, n).
void philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, int num_threads);
// out[i] = uniform(word 1 of philox(seed, offset + i)) >= rho, as 0/1 bytes.
void philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                      int num_threads);

}  // namespace cpu

namespace cuda {

// Launchers enqueue on `stream` (a cudaStream_t) and return a cudaError_t as int
// (0 = cudaSuccess), so this header stays free of CUDA headers.
int philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, void* stream);
int philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                     void* stream);

}  // namespace cuda
}  // namespace cifd
