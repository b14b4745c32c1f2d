// SPDX-License-Identifier: Apache-2.0
// Philox4x32-10, bit-identical to triton.language.randint4x / rand
// (docs/METHOD.md section 5). One copy, used by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#include "cifd/macros.h"

namespace cifd {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
// Largest float32 scale with (2^31 - 1) * scale < 1 after rounding.
constexpr float kUniformScale = 4.6566127342e-10f;

struct Philox4 {
  uint32_t w[4];
};

CIFD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The raw block function on an explicit counter and key.
CIFD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                              uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2);
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The project's convention: key from the 64-bit seed, counter from the 64-bit
// element offset (base offset + linear element index).
CIFD_HD Philox4 philox(uint64_t seed, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// uint32 -> float in [0, 1): bit-cast to int32, negatives by bitwise NOT, times
// the scale in float32. The multiply is a separate rounding step (no FMA).
CIFD_HD float uint_to_uniform(uint32_t w) {
  int32_t i = static_cast<int32_t>(w);
  i = i < 0 ? ~i : i;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(static_cast<float>(i), kUniformScale);
#else
  return static_cast<float>(i) * kUniformScale;
#endif
}

// Noise u = uniform - 1/2, each step rounded on its own so every backend agrees.
CIFD_HD float uniform_noise(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(uint_to_uniform(w), 0.5f);
#else
  return uint_to_uniform(w) - 0.5f;
#endif
}

}  // namespace cifd
