// SPDX-License-Identifier: Apache-2.0
// Per-element math of the fused stage-2 CIFD loss (CIFD_METHOD.md section 4),
// shared by the CPU and CUDA kernels: one copy of each formula.
//
// With p_S = softmax(z / tau), p_m = softmax(t_m / tau), q = softmax(z) over K,
// w_m = lam_m k_m (k_m the keep flag), n = #non-ignored labels, per sample b:
//   ce_b   = lse(z) - z_y (0 if y == ignore_index)     d/dz = lam_ce / n (q - onehot(y))
//   kl_mb  = tau^2 sum_j p_mj (log p_mj - log p_Sj)    d/dz = lam_kl tau / B sum_m w_m (p_S - p_m)
//   emb_mb = sum_d e(u_d - x_md)                        d/du = w_emb / B sum_m w_m e'(u - x_m)
// e(d) = d^2, e' = 2d (mse); e(d) = 0.5 d^2 if |d| < 1 else |d| - 0.5, e' = clamp(d, -1, 1)
// (smooth-L1, beta = 1). The KL is scaled by tau^2 (Hinton's convention).
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

}  // namespace losses
}  // namespace cifd
