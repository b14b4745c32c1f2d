// SPDX-License-Identifier: Apache-2.0
// Philox4x32-10 against the Random123 known-answer vectors, the uniform
// mapping's edge cases, the project's seed/offset convention (values taken
// from triton.language.randint4x) and the CPU kernels against the scalar math.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "check.h"
#include "cifd/kernels.h"
#include "cifd/philox.h"

static void test_known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  // Random123 kat_vectors, philox4x32 with 10 rounds.
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const cifd::Philox4 r =
        cifd::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int j = 0; j < 4; ++j) CHECK(r.w[j] == k.out[j]);
  }
}

static void test_convention() {
  // seed -> key (lo, hi), offset -> counter (lo, hi, 0, 0).
  const uint64_t seed = (uint64_t{0xa4093822u} << 32) | 0x299f31d0u;  // hi, lo swapped on purpose
  const cifd::Philox4 a = cifd::philox(seed, (uint64_t{0x85a308d3u} << 32) | 0x243f6a88u);
  const cifd::Philox4 b =
      cifd::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0, 0, 0x299f31d0u, 0xa4093822u);
  for (int j = 0; j < 4; ++j) CHECK(a.w[j] == b.w[j]);
  // tl.randint4x(0, 0)[0] and tl.randint4x(0, 1)[0] (triton 3.8).
  CHECK(cifd::philox(0, 0).w[0] == 1713891541u);
  CHECK(cifd::philox(0, 1).w[0] == 4175744164u);
}

static void test_uniform_mapping() {
  CHECK(cifd::uint_to_uniform(0u) == 0.0f);
  CHECK(cifd::uint_to_uniform(0xffffffffu) == 0.0f);  // int32 -1 -> ~(-1) = 0
  CHECK(cifd::uint_to_uniform(0x7fffffffu) < 1.0f);
  CHECK(cifd::uint_to_uniform(0x80000000u) < 1.0f);  // INT32_MIN -> INT32_MAX
  CHECK(cifd::uint_to_uniform(0x7fffffffu) == cifd::uint_to_uniform(0x80000000u));
  CHECK(cifd::uint_to_uniform(1u) == 1.0f * cifd::kUniformScale);
  CHECK(cifd::uniform_noise(0u) == -0.5f);
}

static void test_cpu_kernels() {
  const int64_t n = 100003;  // odd, several OpenMP chunks
  const uint64_t seed = 1234567890123ull, offset = (uint64_t{1} << 32) - 77;  // crosses the lo-word carry
  std::vector<float> u(n);
  std::vector<uint8_t> m(n);
  cifd::cpu::philox_uniform(u.data(), n, seed, offset, 2);
  cifd::cpu::philox_keep_mask(m.data(), n, seed, offset, 0.25f, 2);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const cifd::Philox4 r = cifd::philox(seed, offset + static_cast<uint64_t>(i));
    CHECK(u[i] == cifd::uint_to_uniform(r.w[0]));
    CHECK(m[i] == (cifd::uint_to_uniform(r.w[1]) >= 0.25f ? 1 : 0));
    CHECK(u[i] >= 0.0f && u[i] < 1.0f);
    kept += m[i];
  }
  const double frac = static_cast<double>(kept) / n;
  CHECK(frac > 0.74 && frac < 0.76);  // Bernoulli(0.75), ~0.0014 std
}

int main() {
  test_known_answers();
  test_convention();
  test_uniform_mapping();
  test_cpu_kernels();
  if (failures) {
    std::fprintf(stderr, "test_philox: %d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("test_philox: all checks passed\n");
  return EXIT_SUCCESS;
}
