// SPDX-License-Identifier: Apache-2.0
// Philox uniforms and keep masks on the CPU (OpenMP over fixed chunks).
#include "cifd/kernels.h"
#include "cifd/philox.h"

namespace cifd {
namespace cpu {

namespace {
constexpr int64_t kChunk = 1 << 14;  // elements per OpenMP task: amortises scheduling
}

void philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t offset, int num_threads) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = (c + 1) * kChunk < n ? (c + 1) * kChunk : n;
    for (int64_t i = c * kChunk; i < end; ++i) {
      out[i] = uint_to_uniform(philox(seed, offset + static_cast<uint64_t>(i)).w[0]);
    }
  }
}

void philox_keep_mask(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, float rho,
                      int num_threads) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = (c + 1) * kChunk < n ? (c + 1) * kChunk : n;
    for (int64_t i = c * kChunk; i < end; ++i) {
      out[i] = uint_to_uniform(philox(seed, offset + static_cast<uint64_t>(i)).w[1]) >= rho;
    }
  }
}

}  // namespace cpu
}  // namespace cifd
