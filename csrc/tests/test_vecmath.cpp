// SPDX-License-Identifier: Apache-2.0
// cifd/vecmath.h's 8-lane AVX2 functions against std:: in double: exp, log and
// tanh over wide ranges and random bit patterns, with their extremes (0,
// subnormals, the overflow edges, +-inf, NaN); Philox 8 counters at a time
// against the scalar philox() (counter carries included); the uniform
// conversion bit for bit. Skipped (passes) on a CPU without AVX2 + FMA or a
// compiler without the target pragma.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cifd/philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CIFD_TEST_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CIFD_VECMATH_AVX2 1
#include "cifd/vecmath.h"
#endif

#ifdef CIFD_TEST_AVX2
using cifd::vec::F8;

static float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Error in units of the float spacing at the exact value (inf results: 0 if matched).
static double ulp_err(float got, double exact) {
  const float r = static_cast<float>(exact);
  if (std::isinf(r)) return std::isinf(got) && (got > 0) == (r > 0) ? 0.0 : 1e30;
  const double ulp = std::max<double>(std::ldexp(1.0, std::ilogb(r) - 23), std::ldexp(1.0, -149));
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

// f applied to 8 inputs at once, written back.
template <class Fn>
static void apply8(Fn fn, const float* in, float* out) {
  fn(F8::load(in)).store(out);
}

struct Stats {
  double worst = 0.0;
  float at = 0.0f;
  void add(double e, float x) {
    if (e > worst) {
      worst = e;
      at = x;
    }
  }
};

// Runs fn over xs in groups of 8, comparing with ref (double) in ulps where
// `keep(x, exact)` says the point counts; returns the worst.
template <class Fn, class Ref, class Keep>
static Stats sweep(Fn fn, Ref ref, Keep keep, const std::vector<float>& xs) {
  Stats st;
  float in[8], out[8];
  for (size_t i = 0; i < xs.size(); i += 8) {
    for (int l = 0; l < 8; ++l) in[l] = xs[std::min(i + l, xs.size() - 1)];
    apply8(fn, in, out);
    for (int l = 0; l < 8; ++l) {
      const double e = ref(static_cast<double>(in[l]));
      if (keep(in[l], e)) st.add(ulp_err(out[l], e), in[l]);
    }
  }
  return st;
}

static float one(F8 (*fn)(F8), float x) {
  float in[8], out[8];
  for (float& v : in) v = x;
  apply8(fn, in, out);
  return out[3];
}

static void test_exp() {
  std::vector<float> xs;
  for (int i = 0; i <= 2000000; ++i) xs.push_back(-103.0f + 191.0f * static_cast<float>(i) / 2000000.0f);
  const Stats st = sweep([](F8 v) { return cifd::vec::vexp(v); }, [](double x) { return std::exp(x); },
                         [](float, double e) { return e > 1.2e-38; }, xs);
  CHECK_MSG(st.worst <= 2.0, "exp: %.2f ulp at %g", st.worst, st.at);
  // subnormal results: within one subnormal step
  for (float x = -103.0f; x < -87.4f; x += 0.01f) {
    const double e = std::exp(static_cast<double>(x));
    CHECK_MSG(std::fabs(one(cifd::vec::vexp, x) - e) <= 1.5e-45 || e > 1.2e-38, "exp(%g)", x);
  }
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_MSG(one(cifd::vec::vexp, 0.0f) == 1.0f, "exp(0)");
  CHECK_MSG(one(cifd::vec::vexp, -200.0f) == 0.0f && one(cifd::vec::vexp, -inf) == 0.0f, "exp(-big)");
  CHECK_MSG(std::isinf(one(cifd::vec::vexp, 89.0f)) && std::isinf(one(cifd::vec::vexp, inf)), "exp(big)");
  CHECK_MSG(std::isnan(one(cifd::vec::vexp, std::nanf(""))), "exp(NaN)");
  std::printf("vexp: max %.2f ulp on [-103, 88]\n", st.worst);
}

static void test_log() {
  std::mt19937 g(1);
  std::uniform_int_distribution<uint32_t> bits(1u, 0x7f7fffffu);  // positive finite, subnormals too
  std::vector<float> xs;
  for (int i = 0; i < 2000000; ++i) xs.push_back(u2f(bits(g)));
  for (int i = -20000; i <= 20000; ++i) {
    const float x = 1.0f + static_cast<float>(i) * 1e-6f;
    if (x != 1.0f) xs.push_back(x);
  }
  xs.push_back(std::numeric_limits<float>::denorm_min());
  xs.push_back(std::numeric_limits<float>::min());
  xs.push_back(std::numeric_limits<float>::max());
  const Stats st = sweep([](F8 v) { return cifd::vec::vlog(v); }, [](double x) { return std::log(x); },
                         [](float, double) { return true; }, xs);
  CHECK_MSG(st.worst <= 2.0, "log: %.2f ulp at %g", st.worst, st.at);
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_MSG(one(cifd::vec::vlog, 1.0f) == 0.0f, "log(1)");
  CHECK_MSG(one(cifd::vec::vlog, 0.0f) == -inf && one(cifd::vec::vlog, -0.0f) == -inf, "log(0)");
  CHECK_MSG(std::isnan(one(cifd::vec::vlog, -1.0f)) && std::isnan(one(cifd::vec::vlog, -inf)), "log(<0)");
  CHECK_MSG(std::isnan(one(cifd::vec::vlog, std::nanf(""))), "log(NaN)");
  CHECK_MSG(one(cifd::vec::vlog, inf) == inf, "log(inf)");
  std::printf("vlog: max %.2f ulp over positive floats\n", st.worst);
}

static void test_tanh() {
  std::vector<float> xs;
  for (int i = -2000000; i <= 2000000; ++i) xs.push_back(8.0f * static_cast<float>(i) / 2000000.0f);
  std::mt19937 g(2);
  std::uniform_int_distribution<uint32_t> bits(0u, 0x41000000u);  // |x| <= 8, tiny values included
  for (int i = 0; i < 1000000; ++i) {
    const float x = u2f(bits(g));
    xs.push_back(x);
    xs.push_back(-x);
  }
  const Stats st = sweep([](F8 v) { return cifd::vec::vtanh(v); }, [](double x) { return std::tanh(x); },
                         [](float, double) { return true; }, xs);
  // The rational's fit error (2e-8 relative) plus float32 evaluation: a few ulp.
  CHECK_MSG(st.worst <= 8.0, "tanh: %.2f ulp at %g", st.worst, st.at);
  double abs_worst = 0.0;
  for (int i = -100000; i <= 100000; ++i) {  // beyond the clamp: |tanh - 1| <= 2.3e-7
    const float x = 1e4f * static_cast<float>(i) / 100000.0f;
    abs_worst = std::max(abs_worst, std::fabs(one(cifd::vec::vtanh, x) - std::tanh(static_cast<double>(x))));
  }
  CHECK_MSG(abs_worst <= 3e-7, "tanh abs err %g on [-1e4, 1e4]", abs_worst);
  const float inf = std::numeric_limits<float>::infinity();
  const float t8 = one(cifd::vec::vtanh, 8.0f);
  CHECK_MSG(one(cifd::vec::vtanh, inf) == t8 && one(cifd::vec::vtanh, -inf) == -t8, "tanh(+-inf)");
  CHECK_MSG(std::fabs(one(cifd::vec::vtanh, std::nanf(""))) == t8, "tanh(NaN) = +-tanh(8), as tanh_f");
  CHECK_MSG(one(cifd::vec::vtanh, 0.0f) == 0.0f, "tanh(0)");
  CHECK_MSG(t8 <= 1.0f, "tanh(8) <= 1");
  std::printf("vtanh: max %.2f ulp on [-8, 8], max abs err %.2g on [-1e4, 1e4]\n", st.worst, abs_worst);
}

static void test_philox() {
  const uint64_t seeds[] = {0, 0x5EED, 0x123456789abcdefull, (uint64_t{1} << 63) - 1};
  const uint64_t ctrs[] = {0, 77, (uint64_t{1} << 32) - 5, (uint64_t{1} << 40) + 3,
                           (uint64_t{1} << 63) - 9};
  int bad = 0;
  for (uint64_t seed : seeds) {
    for (uint64_t c : ctrs) {
      for (uint64_t step = 0; step < 64; step += 8) {
        const uint64_t ctr = c + step;
        const cifd::vec::PhiloxW01 w =
            cifd::vec::philox8_w01(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
        alignas(32) uint32_t w0[8], w1[8];
        alignas(32) float u[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(w0), w.w0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(w1), w.w1);
        _mm256_store_ps(u, cifd::vec::uint_to_uniform8(w.w0));
        for (int l = 0; l < 8; ++l) {
          const cifd::Philox4 r = cifd::philox(seed, ctr + static_cast<uint64_t>(l));
          const float ur = cifd::uint_to_uniform(r.w[0]);
          if (w0[l] != r.w[0] || w1[l] != r.w[1] || std::memcmp(&u[l], &ur, 4) != 0) ++bad;
        }
      }
    }
  }
  CHECK_MSG(bad == 0, "philox8: %d lanes differ from the scalar philox", bad);
  std::printf("philox8: %s\n", bad == 0 ? "bit-identical to the scalar philox" : "MISMATCH");
}
#endif  // CIFD_TEST_AVX2

#ifdef CIFD_TEST_AVX2
#pragma GCC pop_options
#endif

int main() {
#ifdef CIFD_TEST_AVX2
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
    std::printf("test_vecmath: CPU without AVX2+FMA, skipped\n");
    return EXIT_SUCCESS;
  }
  // The test functions are AVX2 code; they run only after the check above.
  test_exp();
  test_log();
  test_tanh();
  test_philox();
#else
  std::printf("test_vecmath: built without the AVX2 target pragma, skipped\n");
#endif
  if (failures) {
    std::fprintf(stderr, "test_vecmath: %d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("test_vecmath: all checks passed\n");
  return EXIT_SUCCESS;
}
