// SPDX-License-Identifier: Apache-2.0
// Per-element math of the fused stage-2 CIFD loss (docs/METHOD.md section 4),
// shared by the CPU and CUDA kernels: one copy of each formula.
//
// With p_S = softmax(z / tau), p_m = softmax(t_m / tau), q = softmax(z) over K,
// w_m = lam_m k_m (k_m the keep flag), n = #non-ignored labels, per sample b:
//   ce_b   = lse(z) - z_y (0 if y == ignore_index)     d/dz = lam_ce / n (q - onehot(y))
//   kl_mb  = tau^2 sum_j p_mj (log p_mj - log p_Sj)    d/dz = lam_kl tau / B sum_m w_m (p_S - p_m)
//   emb_mb = sum_d e(u_d - x_md)                        d/du = w_emb / B sum_m w_m e'(u - x_m)
// e(d) = d^2, e' = 2d (mse); e(d) = 0.5 d^2 if |d| < 1 else |d| - 0.5, e' = clamp(d, -1, 1)
// (smooth-L1, beta = 1). The KL is scaled by tau^2 (Hinton's convention).
//
// The CPU kernel takes a row's log-sum-exp in two sweeps (max, then sum), which
// vectorise; the CUDA kernel splits a row over a block's threads and uses the
// online form below (OnlineLse: one sweep, partials merged in any order).
// csrc/tests/test_losses.cpp checks both against each other and against double math.
#pragma once
#include <cstdint>

#include "cifd/density.h"

namespace cifd {
namespace losses {

constexpr int kDistMse = 0;
constexpr int kDistSmoothL1 = 1;

// e(d): the per-feature distortion.
CIFD_HDI float dist_value(float d, int kind) {
  if (kind == kDistMse) return d * d;
  const float ad = density::abs_f(d);
  return ad < 1.0f ? 0.5f * d * d : ad - 0.5f;
}

// e'(d): its derivative (smooth-L1: d inside (-1, 1), the sign outside; NaN stays NaN).
CIFD_HDI float dist_grad(float d, int kind) {
  if (kind == kDistMse) return 2.0f * d;
  const float lo = d < -1.0f ? -1.0f : d;
  return lo > 1.0f ? 1.0f : lo;
}

// w_m = lam_m k_m: a dropped target weighs exactly 0, whatever its lam.
CIFD_HDI float target_weight(bool keep, float lam) { return keep ? lam : 0.0f; }

// Whether label y takes part in CE, and whether it also indexes a class.
CIFD_HDI bool label_counts(int64_t y, int64_t ignore_index) { return y != ignore_index; }
CIFD_HDI bool label_in_range(int64_t y, int64_t K, int64_t ignore_index) {
  return label_counts(y, ignore_index) && y >= 0 && y < K;
}

// Whether the loss accepts label y: ignore_index, or a class in [0, K) (what
// F.cross_entropy accepts). Others are refused before a kernel reads them on the CPU
// (python/cifd_loss.cpp: IndexError) and by a device-side assert in the CUDA kernel
// (no host sync). The math below never indexes with an unaccepted label either
// (z_y = 0, no one-hot), so a kernel that was not stopped stays in bounds.
CIFD_HDI bool label_ok(int64_t y, int64_t K, int64_t ignore_index) {
  return !label_counts(y, ignore_index) || (y >= 0 && y < K);
}

// ce_b = lse(z) - z_y; 0 on an ignored row; an out-of-range label (refused upstream)
// contributes z_y = 0.
CIFD_HDI float ce_value(float lse_1, float z_y, bool counts, bool in_range) {
  return counts ? lse_1 - (in_range ? z_y : 0.0f) : 0.0f;
}

// One class's KL summand p_t (log p_t - log p_S), before the tau^2 scale.
CIFD_HDI float kl_term(float p_t, float lp_t, float lp_s) { return p_t * (lp_t - lp_s); }

// dL/dz_j without the label's -c_ce: c_ce q_j + c_kl (w_sum p_Sj - sum_m w_m p_mj), with
// c_ce = lam_ce / n (0 on an ignored row), c_kl = lam_kl tau / B and wp = sum_m w_m p_mj.
// The caller subtracts c_ce at the label (j == y, y in range) after this rounding.
CIFD_HDI float logit_grad(float q, float p_s, float wp, float c_ce, float c_kl, float w_sum) {
  return c_ce * q + c_kl * (w_sum * p_s - wp);
}

// ------------------------------------------------------------------ online log-sum-exp
// Running max m and sum s = sum exp(x - m) of the values pushed so far; empty:
// (-inf, 0). -inf values carry no mass and are skipped (so a row of -inf and
// finite values is handled as the two-sweep form handles it); NaN propagates
// into s; +inf makes the lse +inf (so log-probs NaN or -inf, as log_softmax
// gives NaN). Merging finite partials is commutative bit for
// bit (max and a sum of two products), so a butterfly leaves every lane with the
// same result.
struct OnlineLse {
  float m, s;
};

CIFD_HDI float neg_inf() { return density::u2f(0xff800000u); }

CIFD_HDI OnlineLse lse_empty() { return OnlineLse{neg_inf(), 0.0f}; }

// One exp per value: e = exp(-|x - m|) rescales whichever side is smaller.
CIFD_HDI OnlineLse lse_push(OnlineLse a, float x) {
  if (x == neg_inf()) return a;
  const bool up = x > a.m;  // false for NaN x: s becomes NaN below
  const float e = density::exp_f(-density::abs_f(x - a.m));  // a.m = -inf: e = 0
  return up ? OnlineLse{x, a.s * e + 1.0f} : OnlineLse{a.m, a.s + e};
}

CIFD_HDI OnlineLse lse_merge(OnlineLse a, OnlineLse b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf()) return OnlineLse{m, 0.0f};  // both empty (exp(-inf + inf) would be NaN)
  return OnlineLse{m, a.s * density::exp_f(a.m - m) + b.s * density::exp_f(b.m - m)};
}

// log(sum exp(x)) of the pushed values; -inf when empty.
CIFD_HDI float lse_value(OnlineLse a) { return a.m + density::log_f(a.s); }

}  // namespace losses
}  // namespace cifd
