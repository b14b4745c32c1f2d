// SPDX-License-Identifier: Apache-2.0
// The stage-2 loss math of cifd/losses.h (shared by the CPU and CUDA kernels):
// the distortions and their derivatives against double math and finite
// differences; the online log-sum-exp against double math, split over "threads"
// and merged in the CUDA kernel's order (strided partials, warp butterflies, then
// warps in index order), with -inf, NaN and empty partials; and the CPU kernel
// (csrc/cpu/cifd_loss.cpp) against a double-precision reference of every output,
// including ignored and out-of-range labels and a dropped target full of NaN.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cifd/kernels.h"
#include "cifd/losses.h"

namespace L = cifd::losses;
constexpr float kInf = std::numeric_limits<float>::infinity();

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// ------------------------------------------------------------------ distortions
static void test_distortions() {
  CHECK(L::dist_value(0.5f, L::kDistMse) == 0.25f);
  CHECK(L::dist_grad(-0.5f, L::kDistMse) == -1.0f);
  CHECK(L::dist_value(0.5f, L::kDistSmoothL1) == 0.125f);
  CHECK(L::dist_value(-3.0f, L::kDistSmoothL1) == 2.5f);
  CHECK(L::dist_value(1.0f, L::kDistSmoothL1) == 0.5f);  // both branches meet at |d| = 1
  CHECK(L::dist_grad(0.25f, L::kDistSmoothL1) == 0.25f);
  CHECK(L::dist_grad(7.0f, L::kDistSmoothL1) == 1.0f);
  CHECK(L::dist_grad(-7.0f, L::kDistSmoothL1) == -1.0f);
  CHECK(std::isnan(L::dist_grad(NAN, L::kDistSmoothL1)));
  CHECK(std::isnan(L::dist_value(NAN, L::kDistSmoothL1)));
  // e' against a central difference of e, away from the smooth-L1 kink's neighbourhood
  for (int kind : {L::kDistMse, L::kDistSmoothL1}) {
    for (float d : {-2.5f, -0.7f, -0.01f, 0.3f, 0.95f, 1.6f}) {
      const float h = 1e-3f;
      const double fd =
          (static_cast<double>(L::dist_value(d + h, kind)) - L::dist_value(d - h, kind)) / (2.0 * h);
      CHECK_CLOSE(L::dist_grad(d, kind), fd, 2e-3, 2e-3);
    }
  }
}

static void test_small_helpers() {
  CHECK(L::target_weight(true, 0.3f) == 0.3f);
  CHECK(L::target_weight(false, NAN) == 0.0f);  // a dropped target's weight is exactly 0
  CHECK(L::label_counts(3, -100) && !L::label_counts(-100, -100));
  CHECK(L::label_in_range(0, 5, -100) && L::label_in_range(4, 5, -100));
  CHECK(!L::label_in_range(5, 5, -100) && !L::label_in_range(-1, 5, -100));
  CHECK(!L::label_in_range(2, 5, 2));  // ignore_index inside [0, K) still ignores
  // label_ok: a class or ignore_index (F.cross_entropy's rule), whatever ignore_index is
  CHECK(L::label_ok(0, 5, -100) && L::label_ok(4, 5, -100) && L::label_ok(-100, 5, -100));
  CHECK(!L::label_ok(5, 5, -100) && !L::label_ok(-1, 5, -100) && !L::label_ok(1000000, 5, -100));
  CHECK(!L::label_ok(std::numeric_limits<int64_t>::min(), 5, -100) &&
        !L::label_ok(std::numeric_limits<int64_t>::max(), 5, -100));
  CHECK(L::label_ok(-1, 5, -1) && !L::label_ok(-100, 5, -1));  // another ignore_index
  CHECK(L::label_ok(7, 5, 7) && L::label_ok(2, 5, 2));          // ignore_index past or inside K
  CHECK(!L::label_ok(0, 0, -100) && L::label_ok(-100, 0, -100)); // K = 0: only ignored rows
  CHECK(L::ce_value(3.0f, 1.0f, true, true) == 2.0f);
  CHECK(L::ce_value(3.0f, 1.0f, false, false) == 0.0f);
  CHECK(L::ce_value(3.0f, 0.0f, true, false) == 3.0f);  // out-of-range label: z_y = 0
  CHECK(L::kl_term(0.25f, -1.0f, -3.0f) == 0.5f);
  CHECK(L::logit_grad(0.5f, 0.25f, 0.125f, 2.0f, 4.0f, 1.5f) == 2.0f * 0.5f + 4.0f * (1.5f * 0.25f - 0.125f));
}

// ------------------------------------------------------------------ online log-sum-exp
static double lse_double(const std::vector<float>& x) {
  double m = -INFINITY;
  for (float v : x) m = std::max(m, static_cast<double>(v));
  if (m == -INFINITY) return -INFINITY;
  double s = 0.0;
  for (float v : x) s += std::exp(static_cast<double>(v) - m);
  return m + std::log(s);
}

static L::OnlineLse push_all(const std::vector<float>& x) {
  L::OnlineLse a = L::lse_empty();
  for (float v : x) a = L::lse_push(a, v);
  return a;
}

// The CUDA kernel's order: thread t pushes x[t], x[t + T], ...; each warp of 32
// merges by an xor butterfly (lane 0's result is taken); then warps in order.
static L::OnlineLse block_order(const std::vector<float>& x, int T) {
  std::vector<L::OnlineLse> part(T, L::lse_empty());
  for (size_t j = 0; j < x.size(); ++j) part[j % T] = L::lse_push(part[j % T], x[j]);
  L::OnlineLse total = L::lse_empty();
  for (int w = 0; w < T / 32; ++w) {
    L::OnlineLse lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = part[w * 32 + l];
    for (int o = 16; o > 0; o >>= 1) {
      L::OnlineLse next[32];
      for (int l = 0; l < 32; ++l) next[l] = L::lse_merge(lane[l], lane[l ^ o]);
      for (int l = 0; l < 32; ++l) {
        lane[l] = next[l];
      }
    }
    for (int l = 1; l < 32; ++l) {  // a butterfly leaves every lane with the same bits
      CHECK(same_bits(lane[l].m, lane[0].m) || (std::isnan(lane[l].m) && std::isnan(lane[0].m)));
      CHECK(same_bits(lane[l].s, lane[0].s) || (std::isnan(lane[l].s) && std::isnan(lane[0].s)));
    }
    total = L::lse_merge(total, lane[0]);
  }
  return total;
}

static void test_online_lse() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int n : {1, 2, 7, 33, 1000, 32001}) {
    for (float scale : {1.0f, 3.0f, 40.0f}) {
      for (float shift : {0.0f, 1000.0f, -500.0f}) {  // exp(1000) overflows: the max must come out
        std::vector<float> x(n);
        for (float& v : x) v = scale * nd(rng) + shift;
        const double want = lse_double(x);
        // float sums of n terms: a relative error up to ~n ulp in the worst case, far less
        // in the kernel's order (chains of n / T terms, then a tree)
        const double tol = 2e-7 * (std::fabs(want) + 1.0);
        CHECK_CLOSE(L::lse_value(push_all(x)), want, 0.0, tol + 3e-9 * n);
        for (int T : {32, 128, 512})
          CHECK_CLOSE(L::lse_value(block_order(x, T)), want, 0.0, tol + 3e-9 * (n / T + 32 + T / 32));
      }
    }
  }
  // empty partials (threads past K) change nothing, bit for bit, on either side
  const L::OnlineLse a = push_all({0.3f, -1.2f, 2.5f});
  const L::OnlineLse e = L::lse_empty();
  CHECK(same_bits(L::lse_merge(a, e).m, a.m) && same_bits(L::lse_merge(a, e).s, a.s));
  CHECK(same_bits(L::lse_merge(e, a).m, a.m) && same_bits(L::lse_merge(e, a).s, a.s));
  const L::OnlineLse ee = L::lse_merge(e, e);
  CHECK(ee.m == -kInf && ee.s == 0.0f);  // no NaN from exp(-inf + inf)
  CHECK(L::lse_value(e) == -kInf);
  // merging is commutative bit for bit
  const L::OnlineLse b = push_all({4.0f, -0.5f});
  CHECK(same_bits(L::lse_merge(a, b).m, L::lse_merge(b, a).m));
  CHECK(same_bits(L::lse_merge(a, b).s, L::lse_merge(b, a).s));
  // -inf values carry no mass; all -inf is an empty row (lse -inf, as the two-sweep form)
  CHECK(same_bits(L::lse_value(push_all({-kInf, 0.3f, -kInf, -1.2f, 2.5f})), L::lse_value(a)));
  const L::OnlineLse all_ninf = push_all({-kInf, -kInf});
  CHECK(all_ninf.s == 0.0f && L::lse_value(all_ninf) == -kInf);
  // NaN propagates; +inf makes the lse +inf
  CHECK(std::isnan(L::lse_value(push_all({0.3f, NAN, 1.0f}))));
  CHECK(std::isnan(L::lse_value(push_all({NAN}))));
  CHECK(std::isnan(L::lse_value(L::lse_merge(a, push_all({NAN})))));
  CHECK(L::lse_value(push_all({0.3f, kInf, 1.0f})) == kInf);
  // one value: exact
  CHECK(L::lse_value(push_all({1.75f})) == 1.75f);
}

// ------------------------------------------------------------------ CPU kernel vs double
struct Problem {
  int64_t B, K, D, M;
  std::vector<float> z, t, u, x, lam;
  std::vector<int64_t> y;
  std::vector<uint8_t> keep;
};

static Problem make_problem(int64_t M, int64_t B, int64_t K, int64_t D, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Problem p{B, K, D, M, {}, {}, {}, {}, {}, {}, {}};
  p.z.resize(B * K);
  for (float& v : p.z) v = 3.0f * nd(rng);
  p.t.resize(M * B * K);
  for (int64_t i = 0; i < M * B * K; ++i) p.t[i] = p.z[i % (B * K)] + 2.0f * nd(rng);
  p.u.resize(B * D);
  for (float& v : p.u) v = nd(rng);
  p.x.resize(M * B * D);
  for (int64_t i = 0; i < M * B * D; ++i) p.x[i] = p.u[i % (B * D)] + 0.8f * nd(rng);
  std::uniform_int_distribution<int64_t> cls(0, K - 1);
  p.y.resize(B);
  for (int64_t& v : p.y) v = cls(rng);
  if (B > 1) p.y[1] = -100;  // ignored
  if (B > 2) p.y[2] = K + 3;  // out of range: z_y = 0, no one-hot (the kernels' rule)
  p.lam.resize(M);
  p.keep.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    p.lam[m] = 1.0f - 0.1f * static_cast<float>(m);
    p.keep[m] = (m % 3 != 1);
  }
  // a dropped target is never read: NaN/inf there must not reach any output
  for (int64_t m = 0; m < M; ++m) {
    if (p.keep[m]) continue;
    for (int64_t i = 0; i < B * K; ++i) p.t[m * B * K + i] = (i % 2) ? NAN : kInf;
    for (int64_t i = 0; i < B * D; ++i) p.x[m * B * D + i] = NAN;
  }
  return p;
}

static void test_cpu_kernel(int64_t M, int64_t B, int64_t K, int64_t D, int dist, unsigned seed) {
  const Problem p = make_problem(M, B, K, D, seed);
  const double tau = 2.0, lam_ce = 0.7, lam_kl = 1.3, w_emb = 100.0;
  int64_t n = 0;
  for (int64_t v : p.y) n += v != -100;
  const float nvalid = static_cast<float>(n > 0 ? n : 1);
  cifd::CifdLossProblem pr;
  pr.B = B;
  pr.K = K;
  pr.D = D;
  pr.M = M;
  pr.tau = static_cast<float>(tau);
  pr.lam_ce = static_cast<float>(lam_ce);
  pr.c_kl = static_cast<float>(lam_kl * tau / B);
  pr.c_emb = static_cast<float>(w_emb / B);
  pr.dist = dist;
  pr.ignore_index = -100;
  std::vector<float> ce(B), kl(M * B), em(M * B), gz(B * K), gu(B * D);
  cifd::cpu::cifd_loss_fwd(pr, p.z.data(), p.t.data(), p.y.data(), p.u.data(), p.x.data(),
                           p.lam.data(), p.keep.data(), &nvalid, nullptr, ce.data(), kl.data(),
                           em.data(), gz.data(), gu.data(), 1);
  // the same bits on 2 threads (rows are independent)
  std::vector<float> ce2(B), kl2(M * B), em2(M * B), gz2(B * K), gu2(B * D);
  cifd::cpu::cifd_loss_fwd(pr, p.z.data(), p.t.data(), p.y.data(), p.u.data(), p.x.data(),
                           p.lam.data(), p.keep.data(), &nvalid, nullptr, ce2.data(), kl2.data(),
                           em2.data(), gz2.data(), gu2.data(), 2);
  CHECK(std::memcmp(gz.data(), gz2.data(), gz.size() * 4) == 0);
  CHECK(std::memcmp(kl.data(), kl2.data(), kl.size() * 4) == 0);
  CHECK(std::memcmp(gu.data(), gu2.data(), gu.size() * 4) == 0);

  double w_sum = 0.0;
  for (int64_t m = 0; m < M; ++m) w_sum += p.keep[m] ? p.lam[m] : 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const float* z = p.z.data() + b * K;
    std::vector<double> ls(K), l1(K);  // log p_S (z / tau) and log q (z)
    std::vector<float> zs(K);
    for (int64_t j = 0; j < K; ++j) zs[j] = z[j] / static_cast<float>(tau);
    const double lse_s = lse_double(zs), lse_1 = lse_double(std::vector<float>(z, z + K));
    for (int64_t j = 0; j < K; ++j) {
      ls[j] = z[j] / tau - lse_s;
      l1[j] = z[j] - lse_1;
    }
    const int64_t y = p.y[b];
    const bool counts = y != -100, in_range = counts && y >= 0 && y < K;
    CHECK_CLOSE(ce[b], counts ? lse_1 - (in_range ? z[y] : 0.0) : 0.0, 1e-5, 1e-5);
    std::vector<double> wp(K, 0.0);
    for (int64_t m = 0; m < M; ++m) {
      if (!p.keep[m]) {
        CHECK(kl[m * B + b] == 0.0f);
        continue;
      }
      const float* t = p.t.data() + (m * B + b) * K;
      std::vector<float> ts(K);
      for (int64_t j = 0; j < K; ++j) ts[j] = t[j] / static_cast<float>(tau);
      const double lse_t = lse_double(ts);
      double s = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const double lp = t[j] / tau - lse_t, pt = std::exp(lp);
        s += pt * (lp - ls[j]);
        wp[j] += p.lam[m] * pt;
      }
      CHECK_CLOSE(kl[m * B + b], tau * tau * s, 1e-4, 1e-5);
    }
    const double c_ce = counts ? lam_ce / nvalid : 0.0, c_kl = lam_kl * tau / B;
    double row_sum = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const double g = c_ce * (std::exp(l1[j]) - (in_range && j == y ? 1.0 : 0.0)) +
                       c_kl * (w_sum * std::exp(ls[j]) - wp[j]);
      CHECK_CLOSE(gz[b * K + j], g, 1e-4, 1e-7);
      row_sum += gz[b * K + j];
    }
    // softmax gradients sum to 0 over a row (unless the label is out of range: no one-hot)
    if (!counts || in_range) CHECK_CLOSE(row_sum, 0.0, 0.0, 1e-6);

    std::vector<double> gud(D, 0.0);
    for (int64_t m = 0; m < M; ++m) {
      if (!p.keep[m]) {
        CHECK(em[m * B + b] == 0.0f);
        continue;
      }
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double diff = static_cast<double>(p.u[b * D + d]) - p.x[(m * B + b) * D + d];
        const double ad = std::fabs(diff);
        s += dist == L::kDistMse ? diff * diff : (ad < 1.0 ? 0.5 * diff * diff : ad - 0.5);
        gud[d] += p.lam[m] * (dist == L::kDistMse ? 2.0 * diff : std::max(-1.0, std::min(1.0, diff)));
      }
      CHECK_CLOSE(em[m * B + b], s, 1e-5, 1e-5);
    }
    for (int64_t d = 0; d < D; ++d) CHECK_CLOSE(gu[b * D + d], w_emb / B * gud[d], 1e-5, 1e-6);
  }
}

// Groups: G student sets against the same targets in one call give, group by
// group, the bits of G one-group calls (with that group's c_emb * group_w[g]).
static void test_cpu_kernel_groups(int64_t G, int64_t M, int64_t B, int64_t K, int64_t D,
                                   unsigned seed) {
  const Problem p = make_problem(M, B, K, D, seed);
  std::mt19937 rng(seed + 100);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(G * B * K), u(G * B * D), gw(G);
  for (float& v : z) v = 3.0f * nd(rng);
  for (float& v : u) v = nd(rng);
  for (int64_t g = 0; g < G; ++g) gw[g] = 0.5f + static_cast<float>(g);
  const float nvalid = 3.0f;
  cifd::CifdLossProblem pr;
  pr.B = B;
  pr.G = G;
  pr.K = K;
  pr.D = D;
  pr.M = M;
  pr.tau = 2.0f;
  pr.lam_ce = 0.7f;
  pr.c_kl = static_cast<float>(1.3 * 2.0 / B);
  pr.c_emb = static_cast<float>(10.0 / B);
  pr.dist = L::kDistSmoothL1;
  std::vector<float> ce(G * B), kl(M * G * B), em(M * G * B), gz(G * B * K), gu(G * B * D);
  cifd::cpu::cifd_loss_fwd(pr, z.data(), p.t.data(), p.y.data(), u.data(), p.x.data(), p.lam.data(),
                           p.keep.data(), &nvalid, gw.data(), ce.data(), kl.data(), em.data(),
                           gz.data(), gu.data(), 2);
  for (int64_t g = 0; g < G; ++g) {
    cifd::CifdLossProblem one = pr;
    one.G = 1;
    one.c_emb = pr.c_emb * gw[g];
    std::vector<float> ce1(B), kl1(M * B), em1(M * B), gz1(B * K), gu1(B * D);
    cifd::cpu::cifd_loss_fwd(one, z.data() + g * B * K, p.t.data(), p.y.data(), u.data() + g * B * D,
                             p.x.data(), p.lam.data(), p.keep.data(), &nvalid, nullptr, ce1.data(),
                             kl1.data(), em1.data(), gz1.data(), gu1.data(), 1);
    CHECK(std::memcmp(ce1.data(), ce.data() + g * B, B * 4) == 0);
    CHECK(std::memcmp(gz1.data(), gz.data() + g * B * K, B * K * 4) == 0);
    CHECK(std::memcmp(gu1.data(), gu.data() + g * B * D, B * D * 4) == 0);
    for (int64_t m = 0; m < M; ++m) {
      CHECK(std::memcmp(kl1.data() + m * B, kl.data() + (m * G + g) * B, B * 4) == 0);
      CHECK(std::memcmp(em1.data() + m * B, em.data() + (m * G + g) * B, B * 4) == 0);
    }
  }
}

int main() {
  test_distortions();
  test_small_helpers();
  test_online_lse();
  test_cpu_kernel(1, 1, 7, 5, L::kDistMse, 1);
  test_cpu_kernel(4, 9, 1000, 33, L::kDistSmoothL1, 2);
  test_cpu_kernel(10, 5, 37, 11, L::kDistMse, 3);  // M past the CUDA kernel's register group
  test_cpu_kernel(3, 3, 129, 0, L::kDistSmoothL1, 4);  // no embeddings
  test_cpu_kernel_groups(3, 1, 5, 37, 11, 5);  // the RDM bank's stage 1: M = 1
  test_cpu_kernel_groups(2, 4, 9, 100, 16, 6);
  if (failures) {
    std::fprintf(stderr, "test_losses: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_losses: all passed\n");
  return 0;
}
