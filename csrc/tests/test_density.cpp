// SPDX-License-Identifier: Apache-2.0
// cifd/density.h against straightforward double-precision formulas: exp/log/tanh
// accuracy over wide ranges, float16/bfloat16 conversions (all 65536 patterns),
// rounding, the MLP and bin mass, gradients by central differences in double,
// y_hat; and the CPU kernels (AVX2 loops where the CPU has them, then the
// baseline loops, EbProblem::cpu_avx2 = false) against the element functions, including
// bit-identical results for any thread count.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cifd/density.h"
#include "cifd/kernels.h"

using namespace cifd::density;

// Error of a float result in units of the float spacing at the exact value.
static double ulp_err(float got, double exact) {
  const float r = static_cast<float>(exact);
  if (std::isinf(r)) return std::isinf(got) && (got > 0) == (r > 0) ? 0.0 : 1e30;
  const double ulp = std::max<double>(std::ldexp(1.0, std::ilogb(r) - 23), std::ldexp(1.0, -149));
  return std::fabs(static_cast<double>(got) - exact) / ulp;
}

// ------------------------------------------------------------------ transcendentals
static void test_exp() {
  double worst = 0.0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -103.0f + 191.0f * static_cast<float>(i) / 2000000.0f;  // to 88
    const double e = std::exp(static_cast<double>(x));
    const double err = ulp_err(exp_f(x), e);
    if (e > 1.2e-38) worst = std::max(worst, err);  // normal results
    else CHECK_MSG(std::fabs(exp_f(x) - e) <= 1.5e-45, "x=%g", x);  // subnormal: within 1 ulp
  }
  CHECK_MSG(worst <= 2.0, "exp max ulp %.2f", worst);
  CHECK(exp_f(0.0f) == 1.0f);
  CHECK(exp_f(-200.0f) == 0.0f && exp_f(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(std::isinf(exp_f(89.0f)) && std::isinf(exp_f(std::numeric_limits<float>::infinity())));
  CHECK(std::isnan(exp_f(std::nanf(""))));
  std::printf("exp: max %.2f ulp on [-103, 88]\n", worst);
}

static void test_log() {
  double worst = 0.0;
  std::mt19937 g(1);
  std::uniform_int_distribution<uint32_t> bits(1u, 0x7f7fffffu);  // positive finite, subnormals included
  for (int i = 0; i < 2000000; ++i) {
    const float x = u2f(bits(g));
    worst = std::max(worst, ulp_err(log_f(x), std::log(static_cast<double>(x))));
  }
  for (int i = -20000; i <= 20000; ++i) {  // around 1, where log is small
    const float x = 1.0f + static_cast<float>(i) * 1e-6f;
    if (x != 1.0f) worst = std::max(worst, ulp_err(log_f(x), std::log(static_cast<double>(x))));
  }
  CHECK_MSG(worst <= 2.0, "log max ulp %.2f", worst);
  CHECK(log_f(1.0f) == 0.0f);
  CHECK(std::isinf(log_f(0.0f)) && log_f(0.0f) < 0);
  CHECK(std::isnan(log_f(-1.0f)) && std::isnan(log_f(std::nanf(""))));
  CHECK(std::isinf(log_f(std::numeric_limits<float>::infinity())));
  std::printf("log: max %.2f ulp over positive floats\n", worst);
}

static void test_tanh() {
  double worst = 0.0, worst_abs = 0.0;
  for (int i = -4000000; i <= 4000000; ++i) {
    const float x = static_cast<float>(i) * 2.5e-6f;  // [-10, 10]
    const double t = std::tanh(static_cast<double>(x));
    const float got = tanh_f(x);
    if (std::fabs(x) <= 8.0f) worst = std::max(worst, ulp_err(got, t));
    worst_abs = std::max(worst_abs, std::fabs(got - t));
    CHECK(std::fabs(got) <= 1.0f);
  }
  for (int e = -40; e < 0; ++e) {  // tiny arguments: relative accuracy
    const float x = std::ldexp(1.3f, e);
    worst = std::max(worst, ulp_err(tanh_f(x), std::tanh(static_cast<double>(x))));
    CHECK(tanh_f(-x) == -tanh_f(x));
  }
  CHECK_MSG(worst <= 6.0, "tanh max ulp %.2f on [-8, 8]", worst);
  CHECK_MSG(worst_abs <= 4e-7, "tanh max abs err %.3g", worst_abs);
  CHECK(tanh_f(0.0f) == 0.0f);
  CHECK(std::fabs(tanh_f(std::numeric_limits<float>::infinity()) - 1.0f) < 3e-7f);
  std::printf("tanh: max %.2f ulp on [-8, 8], max abs err %.2e on [-10, 10]\n", worst, worst_abs);
}

// ------------------------------------------------------------------ storage, rounding
static double half_value(uint16_t h) {  // independent decode
  const int e = (h >> 10) & 31, m = h & 1023;
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * std::ldexp(m, -24);
  if (e == 31) return m ? std::nan("") : s * std::numeric_limits<double>::infinity();
  return s * std::ldexp(1024 + m, e - 25);
}

static void test_half() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    const double v = half_value(static_cast<uint16_t>(h));
    if (std::isnan(v)) {
      CHECK(std::isnan(f));
      CHECK((float_to_half(f) & 0x7fffu) > 0x7c00u);
    } else {
      CHECK_MSG(static_cast<double>(f) == v && std::signbit(f) == std::signbit(v), "h=%04x", h);
      CHECK_MSG(float_to_half(f) == h, "h=%04x", h);  // exact round trip
    }
  }
  // float -> half rounds to nearest even: compare with the nearest of all halves.
  std::vector<double> pos;  // all finite positive halves, ascending
  for (uint32_t h = 0; h < 0x7c00; ++h) pos.push_back(half_value(static_cast<uint16_t>(h)));
  std::mt19937 g(2);
  std::uniform_real_distribution<float> mag(-27.0f, 17.0f);
  for (int i = 0; i < 300000; ++i) {
    float x = std::exp2(mag(g));
    if (i % 3 == 0) {  // exact ties between neighbouring halves
      const size_t k = 1 + g() % (pos.size() - 2);
      x = static_cast<float>(0.5 * (pos[k] + pos[k + 1]));
    }
    const uint16_t h = float_to_half(x);
    const double xd = x;
    size_t k = std::lower_bound(pos.begin(), pos.end(), xd) - pos.begin();
    uint16_t want;
    if (k >= pos.size()) {
      want = xd >= 65520.0 ? 0x7c00 : 0x7bff;
    } else if (pos[k] == xd || k == 0) {
      want = static_cast<uint16_t>(k);
    } else {
      const double lo = pos[k - 1], hi = pos[k];
      if (xd - lo < hi - xd) want = static_cast<uint16_t>(k - 1);
      else if (xd - lo > hi - xd) want = static_cast<uint16_t>(k);
      else want = static_cast<uint16_t>((k - 1) % 2 == 0 ? k - 1 : k);
      if (k == pos.size() - 1 && xd > hi) want = xd >= 65520.0 ? 0x7c00 : 0x7bff;
    }
    if (xd >= 65520.0) want = 0x7c00;
    CHECK_MSG(h == want, "x=%.10g got %04x want %04x", x, h, want);
    CHECK(float_to_half(-x) == (want | 0x8000));
  }
  CHECK(float_to_half(1e9f) == 0x7c00 && float_to_half(-1e9f) == 0xfc00);
  CHECK(float_to_half(1e-30f) == 0 && float_to_half(-1e-30f) == 0x8000);
}

static void test_bf16() {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    CHECK_MSG(float_to_bf16(f) == b, "b=%04x", b);
  }
  std::mt19937 g(3);
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = g();
    const float x = u2f(u);
    if (std::isnan(x)) {
      CHECK(std::isnan(bf16_to_float(float_to_bf16(x))));
      continue;
    }
    const uint16_t b = float_to_bf16(x);
    const double lo = bf16_to_float(static_cast<uint16_t>(u >> 16));  // truncation
    double hi_v = static_cast<double>(bf16_to_float(static_cast<uint16_t>((u >> 16) + 1)));
    if (std::isinf(hi_v)) hi_v = std::copysign(std::ldexp(1.0, 128), hi_v);  // rounds to inf
    const double d0 = std::fabs(static_cast<double>(x) - lo), d1 = std::fabs(hi_v - x);
    const uint16_t t = static_cast<uint16_t>(u >> 16);
    const uint16_t want = d0 < d1 ? t : (d1 < d0 ? static_cast<uint16_t>(t + 1) : ((t & 1) ? t + 1 : t));
    if (std::isinf(x)) CHECK(b == t);
    else CHECK_MSG(b == want, "x=%g got %04x want %04x", x, b, want);
  }
}

static void test_round() {
  std::mt19937 g(4);
  std::uniform_real_distribution<float> d(-1e4f, 1e4f);
  for (int i = 0; i < 1000000; ++i) {
    float x = d(g);
    if (i % 4 == 0) x = std::floor(x) + 0.5f;  // ties
    const float r = round_half_even(x);
    CHECK_MSG(r == std::nearbyint(x) && std::signbit(r) == std::signbit(x), "x=%g", x);
  }
  CHECK(std::signbit(round_half_even(-0.3f)) && round_half_even(-0.3f) == 0.0f);
  CHECK(round_half_even(2.5f) == 2.0f && round_half_even(3.5f) == 4.0f);
  CHECK(round_half_even(1e20f) == 1e20f && std::isnan(round_half_even(std::nanf(""))));
}

// ------------------------------------------------------------------ the density
struct Params {
  double v[kNumPacked];
};

static Params random_params(std::mt19937& g) {
  std::uniform_real_distribution<double> w(0.2, 1.6), b(-0.8, 0.8), a(-0.9, 0.9);
  Params P;
  auto fill = [&](int base, int nw, int nb, int na) {
    for (int i = 0; i < nw; ++i) P.v[base + i] = w(g);
    for (int i = 0; i < nb; ++i) P.v[base + nw + i] = b(g);
    for (int i = 0; i < na; ++i) P.v[base + nw + nb + i] = a(g);
  };
  fill(0, 3, 3, 3);
  for (int k = 1; k <= 3; ++k) fill(9 + 15 * (k - 1), 9, 3, 3);
  fill(54, 3, 1, 0);
  return P;
}

// Straightforward double-precision f(x) in the packed layout.
static double mlp_ref(double x, const Params& P) {
  double h[3];
  for (int j = 0; j < 3; ++j) {
    const double q = P.v[j] * x + P.v[3 + j];
    h[j] = q + P.v[6 + j] * std::tanh(q);
  }
  for (int k = 1; k <= 3; ++k) {
    const int base = 9 + 15 * (k - 1);
    double o[3];
    for (int j = 0; j < 3; ++j) {
      double q = P.v[base + 9 + j];
      for (int i = 0; i < 3; ++i) q += P.v[base + 3 * j + i] * h[i];
      o[j] = q + P.v[base + 12 + j] * std::tanh(q);
    }
    for (int j = 0; j < 3; ++j) h[j] = o[j];
  }
  return P.v[54] * h[0] + P.v[55] * h[1] + P.v[56] * h[2] + P.v[57];
}

static double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Bin mass of y_hat in double, reflected into the lower tail (in the upper tail
// the plain difference of two sigmoids near 1 cancels even in double).
static double mass_ref(double yh, const Params& P) {
  const double lo = mlp_ref(yh - 0.5, P), up = mlp_ref(yh + 0.5, P);
  const double g = lo + up > 0 ? -1.0 : 1.0;
  return std::fabs(sigmoid(g * up) - sigmoid(g * lo));
}

static void test_mlp_and_mass() {
  std::mt19937 g(5);
  double worst_f = 0.0, worst_p = 0.0;
  for (int trial = 0; trial < 200; ++trial) {
    const Params P = random_params(g);
    float pf[kNumPacked];
    for (int r = 0; r < kNumPacked; ++r) pf[r] = static_cast<float>(P.v[r]);
    Params Pr;  // the float-rounded parameters, so only the arithmetic differs
    for (int r = 0; r < kNumPacked; ++r) Pr.v[r] = pf[r];
    for (int i = 0; i < 50; ++i) {
      const float x = -6.0f + 12.0f * static_cast<float>(i) / 49.0f;
      const double f = mlp_ref(x, Pr);
      worst_f = std::max(worst_f, std::fabs(mlp_value(x, pf, 1) - f) / std::max(1.0, std::fabs(f)));
      const double p = mass_ref(x, Pr);
      if (p > 1e-6) worst_p = std::max(worst_p, std::fabs(bin_mass(mlp_value(x - 0.5f, pf, 1), mlp_value(x + 0.5f, pf, 1)) - p) / p);
      CHECK(likelihood(x, pf, 1, 1e-9f) >= 1e-9f);
    }
  }
  CHECK_MSG(worst_f < 1e-5, "mlp rel err %.3g", worst_f);
  CHECK_MSG(worst_p < 2e-5, "bin mass rel err %.3g", worst_p);
  // far tails: the stable form stays accurate where the plain difference cancels
  float pf[kNumPacked];
  const Params P = random_params(g);
  for (int r = 0; r < kNumPacked; ++r) pf[r] = static_cast<float>(P.v[r]);
  CHECK(lower_bound(bin_mass(30.0f, 31.0f), 1e-9f) == 1e-9f);
  CHECK(bin_mass(-3.0f, -2.0f) > 0.0f && std::fabs(bin_mass(2.0f, 3.0f) - bin_mass(-3.0f, -2.0f)) < 1e-7f);
  CHECK(std::isnan(lower_bound(std::nanf(""), 1e-9f)));
  CHECK(lower_bound_grad(1e-12f, 1e-9f, 2.0f) == 0.0f && lower_bound_grad(1e-12f, 1e-9f, -2.0f) == -2.0f);
  CHECK(lower_bound_grad(0.5f, 1e-9f, 2.0f) == 2.0f);
  std::printf("mlp: rel err %.2e, bin mass: rel err %.2e\n", worst_f, worst_p);
}

// dL/d(params, y_hat) for L = g_lik p_b - g_rate ln p_b, against central differences of
// the double formula.
static void test_gradients() {
  std::mt19937 g(6);
  double worst = 0.0;
  for (int trial = 0; trial < 60; ++trial) {
    Params P = random_params(g);
    float pf[kNumPacked];
    for (int r = 0; r < kNumPacked; ++r) {
      pf[r] = static_cast<float>(P.v[r]);
      P.v[r] = pf[r];
    }
    const float yh = -3.0f + 6.0f * static_cast<float>(trial % 13) / 12.0f + 0.1f * (trial % 3);
    const double gl = 0.7 - 0.05 * trial, gr = 1.3;
    auto loss = [&](const Params& Q, double y) {
      const double p = mass_ref(y, Q);  // bound 0 below: LowerBound is tested on its own
      return gl * p - gr * std::log(p);
    };
    if (mass_ref(yh, P) < 1e-20) continue;  // float p would underflow (bound 0 here)
    float acc[kNumGrad] = {};
    const float dy = likelihood_backward(yh, static_cast<float>(gl), static_cast<float>(gr), true,
                                         0.0f, pf, 1, acc, 1);
    const double h = 1e-6;
    double scale = 1e-3;
    double fd[kNumPacked + 1];
    for (int r = 0; r <= kNumPacked; ++r) {
      Params a = P, b = P;
      double ya = yh, yb = yh;
      if (r < kNumPacked) {
        a.v[r] += h;
        b.v[r] -= h;
      } else {
        ya += h;
        yb -= h;
      }
      fd[r] = (loss(a, ya) - loss(b, yb)) / (2 * h);
      scale = std::max(scale, std::fabs(fd[r]));
    }
    for (int r = 0; r <= kNumPacked; ++r) {
      const double got = r < kNumPacked ? acc[r] : dy;
      const double err = std::fabs(got - fd[r]) / scale;
      worst = std::max(worst, err);
      CHECK_MSG(err < 2e-4, "trial %d row %d: got %.6g fd %.6g", trial, r, got, fd[r]);
    }
    CHECK(acc[kMedianRow] == 0.0f);
  }
  std::printf("gradients vs central differences: max rel err %.2e\n", worst);
}

static void test_y_hat() {
  const uint64_t seed = 0x123456789abcull, ctr = (uint64_t{1} << 32) + 5;
  const cifd::Philox4 w = cifd::philox(seed, ctr);
  const float u = cifd::uniform_noise(w.w[0]);
  const bool keep = cifd::uint_to_uniform(w.w[1]) >= 0.3f;
  const YHat a = y_hat(kNoise, 1.75f, 0.0f, seed, ctr, 0.3f, 0.5f);
  const float su = 0.5f * u;
  CHECK(a.keep == (keep ? 1u : 0u));
  CHECK(a.value == (keep ? 1.75f + su : 0.0f));
  const YHat b = y_hat(kDequantize, 2.6f, 0.2f, seed, ctr, 0.9f, 1.0f);
  CHECK(b.keep == 1u && b.value == std::nearbyint(2.6f - 0.2f) + 0.2f);
  CHECK(y_hat(kNone, -3.25f, 0.0f, seed, ctr, 0.9f, 1.0f).value == -3.25f);
  CHECK(y_hat(kNoise, 1.0f, 0.0f, seed, ctr, 1.0f, 1.0f).value == 0.0f || cifd::uint_to_uniform(w.w[1]) >= 1.0f);
}

// ------------------------------------------------------------------ CPU kernels
static void test_cpu_kernels(bool avx2) {
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  const int64_t shapes[][3] = {{37, 70, 1}, {5, 3, 13}, {1, 1, 1}, {130, 2, 1}};
  for (const auto& sh : shapes) {
    for (int mode = 0; mode < 3; ++mode) {
      cifd::EbProblem pr;
      pr.N = sh[0];
      pr.C = sh[1];
      pr.S = sh[2];
      pr.mode = mode;
      pr.seed = 99;
      pr.offset = (uint64_t{1} << 32) - 100;  // crosses the counter's low-word carry
      pr.rho = mode == 0 ? 0.25f : 0.0f;
      pr.s = mode == 0 ? 0.5f : 1.0f;
      pr.cpu_avx2 = avx2;
      const int64_t C = pr.C, S = pr.S, n_el = pr.N * C * S;
      std::vector<float> y(n_el), packed(kNumPacked * C), med(C), gyh(n_el), glik(n_el), grate(pr.N);
      for (auto& v : y) v = nd(g);
      for (auto& v : gyh) v = nd(g);
      for (auto& v : glik) v = nd(g);
      for (auto& v : grate) v = nd(g);
      for (auto& v : med) v = 0.1f * nd(g);
      for (int64_t c = 0; c < C; ++c) {
        const Params P = random_params(g);
        for (int r = 0; r < kNumPacked; ++r) packed[r * C + c] = static_cast<float>(P.v[r]);
      }
      std::vector<float> yh(n_el), rate(pr.N), lik(n_el), gy(n_el), gp(kNumGrad * C);
      cifd::cpu::entropy_bottleneck_fwd(pr, y.data(), packed.data(), med.data(), yh.data(),
                                        rate.data(), lik.data(), 2);
      cifd::cpu::entropy_bottleneck_bwd(pr, y.data(), packed.data(), med.data(), gyh.data(),
                                        grate.data(), glik.data(), gy.data(), gp.data(), true, 2);
      // element by element
      Scalars sc{mode, static_cast<uint32_t>(pr.seed), static_cast<uint32_t>(pr.seed >> 32), pr.rho,
                 pr.s, pr.bound};
      std::vector<double> want_gp(kNumGrad * C, 0.0), abs_gp(kNumGrad * C, 0.0);
      for (int64_t n = 0; n < pr.N; ++n) {
        double r_want = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          float pc[kNumPacked];
          for (int r = 0; r < kNumPacked; ++r) pc[r] = packed[r * C + c];
          for (int64_t s = 0; s < S; ++s) {
            const int64_t i = (n * C + c) * S + s;
            const uint64_t ctr = pr.offset + static_cast<uint64_t>(i);
            float e_yh, e_lik;
            r_want += element_forward(sc, y[i], med[c], static_cast<uint32_t>(ctr),
                                      static_cast<uint32_t>(ctr >> 32), pc, 1, &e_yh, &e_lik);
            CHECK(std::memcmp(&e_yh, &yh[i], 4) == 0);  // y_hat bit for bit
            // the kernels may fuse multiply-adds (AVX2 + FMA); the element functions here do not
            CHECK_MSG(std::fabs(e_lik - lik[i]) <= 3e-5f * e_lik + 1e-12f, "lik %g %g", e_lik, lik[i]);
            float acc[kNumGrad] = {};
            const float e_gy = element_backward(sc, y[i], med[c], static_cast<uint32_t>(ctr),
                                                static_cast<uint32_t>(ctr >> 32), gyh[i], glik[i],
                                                grate[n], pc, 1, acc, 1);
            CHECK_MSG(std::fabs(e_gy - gy[i]) <= 1e-3f * (1.0f + std::fabs(e_gy)), "gy %g %g", e_gy, gy[i]);
            for (int r = 0; r < kNumGrad; ++r) {
              want_gp[r * C + c] += acc[r];
              abs_gp[r * C + c] += std::fabs(acc[r]);
            }
          }
        }
        CHECK_MSG(std::fabs(r_want - rate[n]) <= 1e-4 * (1.0 + std::fabs(r_want)), "rate %g %g", r_want, rate[n]);
      }
      for (int64_t k = 0; k < kNumGrad * C; ++k)
        CHECK_MSG(std::fabs(want_gp[k] - gp[k]) <= 1e-4 * (1.0 + abs_gp[k]), "gp[%lld] %g %g",
                  static_cast<long long>(k), want_gp[k], gp[k]);
      // thread count never changes a bit
      for (int threads : {1, 3}) {
        std::vector<float> yh2(n_el), rate2(pr.N), lik2(n_el), gy2(n_el), gp2(kNumGrad * C);
        cifd::cpu::entropy_bottleneck_fwd(pr, y.data(), packed.data(), med.data(), yh2.data(),
                                          rate2.data(), lik2.data(), threads);
        cifd::cpu::entropy_bottleneck_bwd(pr, y.data(), packed.data(), med.data(), gyh.data(),
                                          grate.data(), glik.data(), gy2.data(), gp2.data(), true,
                                          threads);
        CHECK(std::memcmp(rate.data(), rate2.data(), 4 * rate.size()) == 0);
        CHECK(std::memcmp(lik.data(), lik2.data(), 4 * lik.size()) == 0);
        CHECK(std::memcmp(gy.data(), gy2.data(), 4 * gy.size()) == 0);
        CHECK(std::memcmp(gp.data(), gp2.data(), 4 * gp.size()) == 0);
      }
    }
  }
}

int main() {
  test_exp();
  test_log();
  test_tanh();
  test_half();
  test_bf16();
  test_round();
  test_mlp_and_mass();
  test_gradients();
  test_y_hat();
  test_cpu_kernels(true);   // the AVX2 loops where the CPU has them
  test_cpu_kernels(false);  // the baseline loops
  if (failures) {
    std::fprintf(stderr, "test_density: %d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("test_density: all checks passed\n");
  return EXIT_SUCCESS;
}
