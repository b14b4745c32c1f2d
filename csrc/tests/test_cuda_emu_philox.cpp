// SPDX-License-Identifier: Apache-2.0
// The CUDA Philox launchers and kernels (csrc/cuda/philox.cu), run on the CPU
// through cuda_emu.h: the grid-stride loops give the CPU kernels' bits, element
// for element, with the counter crossing a 32-bit word boundary.
#include "cuda_emu.h"  // first: it defines what the .cu file expects of CUDA

#include <vector>

#include "../cuda/philox.cu"
#include "check.h"
#include "cifd/kernels.h"

int main() {
  const uint64_t seed = (1ULL << 40) + 7, offset = (1ULL << 32) - 300;
  for (int64_t n : {1, 255, 257, 1000}) {
    std::vector<float> u_cpu(n), u_emu(n, -1.0f);
    cifd::cpu::philox_uniform(u_cpu.data(), n, seed, offset, 1);
    CHECK(cifd::cuda::philox_uniform(u_emu.data(), n, seed, offset, nullptr) == 0);
    CHECK_MSG(u_cpu == u_emu, "uniform bits, n = %lld", static_cast<long long>(n));
    std::vector<uint8_t> k_cpu(n), k_emu(n, 7);
    cifd::cpu::philox_keep_mask(k_cpu.data(), n, seed, offset, 0.3f, 1);
    CHECK(cifd::cuda::philox_keep_mask(k_emu.data(), n, seed, offset, 0.3f, nullptr) == 0);
    CHECK_MSG(k_cpu == k_emu, "keep bits, n = %lld", static_cast<long long>(n));
  }
  std::vector<float> none(1, 5.0f);
  CHECK(cifd::cuda::philox_uniform(none.data(), 0, seed, offset, nullptr) == 0 && none[0] == 5.0f);
  if (failures == 0) std::printf("test_cuda_emu_philox: all passed\n");
  return failures;
}
