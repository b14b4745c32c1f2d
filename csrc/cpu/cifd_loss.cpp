// SPDX-License-Identifier: Apache-2.0
// Fused stage-2 CIFD loss on the CPU (math in cifd/losses.h): OpenMP over chunks of
// 8 rows (samples; G B of them with groups, kernels.h). The logits' part: for
// K <= kSmallK the chunk's rows go through block_logits, a row per vector lane over
// [K][8] float32 scratch; for larger K row by row, the student's and the kept targets'
// rows converted once into float32 scratch and `#pragma omp simd` loops making two
// sweeps over K (max and sum of exp; then log-probs, KL and the gradient). The
// embedding part: row by row, one sweep over D. exp/log are density.h's polynomial
// exp_f/log_f, which vectorise. The loops are compiled for baseline x86-64 and for
// AVX2 + FMA, picked at run time. Each row's result depends only on that row, so it
// never depends on num_threads.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cifd/density.h"
#include "cifd/kernels.h"
#include "cifd/losses.h"

#if defined(__GNUC__)
#define CIFD_NOINLINE __attribute__((noinline))
#else
#define CIFD_NOINLINE
#endif

namespace cifd {
namespace cpu {

namespace {

using density::exp_f;
using density::log_f;

template <class E>
CIFD_HDI void to_float(const typename E::T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = E::load(src[i]);
}

template <class E>
CIFD_HDI void from_float(const float* src, typename E::T* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = E::store(src[i]);
}

// x *= scale in place; returns log(sum(exp(x - max))) + max.
CIFD_HDI float scaled_lse(float* x, int64_t n, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    x[i] *= scale;
    mx = std::max(mx, x[i]);
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_f(x[i] - mx);
  return mx + log_f(s);
}

// Everything one row needs that does not change with the row.
struct Ctx {
  const CifdLossProblem* pr;
  const void *logits, *targets, *emb, *target_embs;
  const int64_t* labels;
  const uint8_t* keep;
  const float* w;        // lam_m k_m
  const float* group_w;  // [G] or null
  int64_t rows;          // G B
  float w_sum, inv_tau, tau2, c_ce_all;
  float *ce, *kl, *emb_terms;
  void *grad_logits, *grad_emb;
};

// Per-thread float32 scratch: z [K], z / tau [K], one target row [K], acc [max(K, D)],
// u [D], x [D].
struct Scratch {
  float *z, *zs, *t, *acc, *u, *x;
  float* blk;  // [4][K][kLanes] for block_logits (K <= kSmallK), else null
};

// Student row r = g B + b against target row b (kernels.h, groups): the logits'
// terms and gradient, vectorised over the row's K classes.
template <class EL>
CIFD_HDI void row_logits(const Ctx& c, int64_t r, const Scratch& sc) {
  using TL = typename EL::T;
  const CifdLossProblem& pr = *c.pr;
  const int64_t B = pr.B, K = pr.K, M = pr.M, R = c.rows;
  const int64_t b = r % B;
  float* z = sc.z;
  float* zs = sc.zs;
  float* acc = sc.acc;
  const int64_t label = c.labels[b];
  const bool row_ok = losses::label_counts(label, pr.ignore_index);
  const bool in_range = losses::label_in_range(label, K, pr.ignore_index);
  to_float<EL>(static_cast<const TL*>(c.logits) + r * K, z, K);
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) zs[j] = z[j];
  const float lse_1 = scaled_lse(z, K, 1.0f);
  const float lse_s = scaled_lse(zs, K, c.inv_tau);
  c.ce[r] = losses::ce_value(lse_1, in_range ? z[label] : 0.0f, row_ok, in_range);

  // zs becomes log p_S; acc collects sum_m w_m p_m
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) {
    zs[j] -= lse_s;
    acc[j] = 0.0f;
  }
  for (int64_t m = 0; m < M; ++m) {
    if (!c.keep[m]) {  // a dropped target is never read
      c.kl[m * R + r] = 0.0f;
      continue;
    }
    float* tm = sc.t;
    to_float<EL>(static_cast<const TL*>(c.targets) + (m * B + b) * K, tm, K);
    const float lse_t = scaled_lse(tm, K, c.inv_tau);
    const float wm = c.w[m];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < K; ++j) {
      const float lp = tm[j] - lse_t;
      const float p = exp_f(lp);
      s += losses::kl_term(p, lp, zs[j]);
      acc[j] += wm * p;
    }
    c.kl[m * R + r] = c.tau2 * s;
  }
  const float c_ce = row_ok ? c.c_ce_all : 0.0f;
  const float c_kl = pr.c_kl, w_sum = c.w_sum;
#pragma omp simd
  for (int64_t j = 0; j < K; ++j)
    z[j] = losses::logit_grad(exp_f(z[j] - lse_1), exp_f(zs[j]), acc[j], c_ce, c_kl, w_sum);
  if (in_range) z[label] -= c_ce;
  from_float<EL>(z, static_cast<TL*>(c.grad_logits) + r * K, K);
}

// Row r's embedding terms and gradient, vectorised over D.
template <class EE>
CIFD_HDI void row_emb(const Ctx& c, int64_t r, const Scratch& sc) {
  using TE = typename EE::T;
  const CifdLossProblem& pr = *c.pr;
  const int64_t B = pr.B, D = pr.D, M = pr.M, R = c.rows;
  const int64_t b = r % B;
  float* acc = sc.acc;
  float* u = sc.u;
  float* x = sc.x;
  to_float<EE>(static_cast<const TE*>(c.emb) + r * D, u, D);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  const int kind = pr.dist;
  for (int64_t m = 0; m < M; ++m) {
    if (!c.keep[m]) {
      c.emb_terms[m * R + r] = 0.0f;
      continue;
    }
    to_float<EE>(static_cast<const TE*>(c.target_embs) + (m * B + b) * D, x, D);
    const float wm = c.w[m];
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) {
      const float diff = u[d] - x[d];
      s += losses::dist_value(diff, kind);
      acc[d] += wm * losses::dist_grad(diff, kind);
    }
    c.emb_terms[m * R + r] = s;
  }
  const float c_emb = c.group_w ? pr.c_emb * c.group_w[r / B] : pr.c_emb;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] *= c_emb;
  from_float<EE>(acc, static_cast<TE*>(c.grad_emb) + r * D, D);
}

// ------------------------------------------------------------------ small K
// With few classes (K = 10 in the Fashion-MNIST recipe) a row's K-long sweeps are
// one vector and a scalar tail each, and every log-sum-exp ends in a horizontal
// reduction: ~570 ns a row at K = 10, M = 4. block_logits runs kLanes rows at once
// instead, a row per lane: the rows are transposed into [K][kLanes] scratch, and
// every loop over the classes is a vertical operation on kLanes-wide vectors, with
// the same per-element math (losses.h, exp_f/log_f) as row_logits. A lane's result
// depends on its row only (a partial block's idle lanes compute on zeros and are
// not stored), so the bits do not depend on the blocking or the thread count; they
// differ from row_logits' in the order of the sums over K.
constexpr int64_t kLanes = 8;
constexpr int64_t kSmallK = 128;  // block_logits up to this K (faster at every K measured, 7 to 128)

// x[K][kLanes] *= scale in place; out[l] = log(sum_j exp(x[j][l] - max)) + max, per lane.
CIFD_HDI void lse_lanes(float* x, int64_t K, float scale, float* out) {
  constexpr int64_t L = kLanes;
  alignas(32) float mx[L], sum[L];
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) mx[l] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      x[j * L + l] *= scale;
      mx[l] = std::max(mx[l], x[j * L + l]);
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) sum[l] = 0.0f;
  for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) sum[l] += exp_f(x[j * L + l] - mx[l]);
  }
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) out[l] = mx[l] + log_f(sum[l]);
}

template <class EL>
CIFD_HDI void block_logits(const Ctx& c, int64_t r0, int64_t n, float* blk) {
  using TL = typename EL::T;
  constexpr int64_t L = kLanes;
  const CifdLossProblem& pr = *c.pr;
  const int64_t B = pr.B, K = pr.K, M = pr.M, R = c.rows;
  float* z = blk;           // [K][L] logits, then the logits' gradient
  float* zs = blk + K * L;  // [K][L] z / tau, then log p_S
  float* t = blk + 2 * K * L;
  float* acc = blk + 3 * K * L;
  alignas(32) float lse_1[L], lse_s[L], kl[L], c_ce[L];
  int64_t label[L], trow[L];
  const TL* logits = static_cast<const TL*>(c.logits);
  for (int64_t l = 0; l < L; ++l) {
    const bool live = l < n;
    const int64_t r = r0 + (live ? l : 0);
    label[l] = live ? c.labels[r % B] : pr.ignore_index;
    trow[l] = r % B;
    for (int64_t j = 0; j < K; ++j) z[j * L + l] = live ? EL::load(logits[r * K + j]) : 0.0f;
  }
#pragma omp simd
  for (int64_t i = 0; i < K * L; ++i) zs[i] = z[i];
  lse_lanes(z, K, 1.0f, lse_1);
  lse_lanes(zs, K, c.inv_tau, lse_s);
  for (int64_t l = 0; l < n; ++l) {
    const bool row_ok = losses::label_counts(label[l], pr.ignore_index);
    const bool in_range = losses::label_in_range(label[l], K, pr.ignore_index);
    c.ce[r0 + l] = losses::ce_value(lse_1[l], in_range ? z[label[l] * L + l] : 0.0f, row_ok, in_range);
    c_ce[l] = row_ok ? c.c_ce_all : 0.0f;
  }
  for (int64_t l = n; l < L; ++l) c_ce[l] = 0.0f;
  for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      zs[j * L + l] -= lse_s[l];
      acc[j * L + l] = 0.0f;
    }
  }
  const TL* targets = static_cast<const TL*>(c.targets);
  for (int64_t m = 0; m < M; ++m) {
    if (!c.keep[m]) {  // a dropped target is never read
      for (int64_t l = 0; l < n; ++l) c.kl[m * R + r0 + l] = 0.0f;
      continue;
    }
    for (int64_t l = 0; l < L; ++l) {
      const TL* src = targets + (m * B + trow[l]) * K;
      for (int64_t j = 0; j < K; ++j) t[j * L + l] = l < n ? EL::load(src[j]) : 0.0f;
    }
    alignas(32) float lse_t[L];
    lse_lanes(t, K, c.inv_tau, lse_t);
    const float wm = c.w[m];
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) kl[l] = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const float lp = t[j * L + l] - lse_t[l];
        const float p = exp_f(lp);
        kl[l] += losses::kl_term(p, lp, zs[j * L + l]);
        acc[j * L + l] += wm * p;
      }
    }
    for (int64_t l = 0; l < n; ++l) c.kl[m * R + r0 + l] = c.tau2 * kl[l];
  }
  const float c_kl = pr.c_kl, w_sum = c.w_sum;
  for (int64_t j = 0; j < K; ++j) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l)
      z[j * L + l] = losses::logit_grad(exp_f(z[j * L + l] - lse_1[l]), exp_f(zs[j * L + l]),
                                        acc[j * L + l], c_ce[l], c_kl, w_sum);
  }
  TL* grad = static_cast<TL*>(c.grad_logits);
  for (int64_t l = 0; l < n; ++l) {
    if (losses::label_in_range(label[l], K, pr.ignore_index)) z[label[l] * L + l] -= c_ce[l];
    for (int64_t j = 0; j < K; ++j) grad[(r0 + l) * K + j] = EL::store(z[j * L + l]);
  }
}

// Rows [r0, r1), at most kLanes of them: the logits' part by rows or by a block,
// then each row's embedding part.
template <class EL, class EE>
CIFD_HDI void rows_body(const Ctx& c, int64_t r0, int64_t r1, const Scratch& sc) {
  if (c.pr->K <= kSmallK) {
    block_logits<EL>(c, r0, r1 - r0, sc.blk);
  } else {
    for (int64_t r = r0; r < r1; ++r) row_logits<EL>(c, r, sc);
  }
  if (c.pr->D > 0) {
    for (int64_t r = r0; r < r1; ++r) row_emb<EE>(c, r, sc);
  }
}

template <class EL, class EE>
using RowsFn = void (*)(const Ctx&, int64_t, int64_t, const Scratch&);

// The row loop for the baseline ISA and for AVX2 + FMA (the always_inline bodies
// take the ISA of the function they are inlined into), picked at run time. No
// optimize("...") attribute here: with g++ 12 it made the AVX2 loop 1.5x SLOWER
// than the baseline one (55 vs 35 ms a [4, 1024, 1000] + D 512 batch, 1 thread);
// without it the AVX2 loop takes 18 ms.
template <class EL, class EE>
CIFD_NOINLINE void rows_base(const Ctx& c, int64_t b0, int64_t b1, const Scratch& sc) {
  rows_body<EL, EE>(c, b0, b1, sc);
}
#if defined(__x86_64__) && defined(__GNUC__)
#define CIFD_LOSS_AVX2 1
template <class EL, class EE>
__attribute__((target("avx2,fma"))) CIFD_NOINLINE void rows_avx2(
    const Ctx& c, int64_t b0, int64_t b1, const Scratch& sc) {
  rows_body<EL, EE>(c, b0, b1, sc);
}
#endif

template <class EL, class EE>
RowsFn<EL, EE> pick_rows() {
#ifdef CIFD_LOSS_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return &rows_avx2<EL, EE>;
#endif
  return &rows_base<EL, EE>;
}

template <class EL, class EE>
void run(const CifdLossProblem& pr, const void* logits, const void* targets,
         const int64_t* labels, const void* emb, const void* target_embs, const float* lam,
         const uint8_t* keep, const float* nvalid, const float* group_w, float* ce, float* kl,
         float* emb_terms, void* grad_logits, void* grad_emb, int num_threads) {
  const int64_t K = pr.K, D = pr.D, M = pr.M, R = pr.G * pr.B;
  std::vector<float> w(M);
  float w_sum = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    w[m] = losses::target_weight(keep[m] != 0, lam[m]);
    w_sum += w[m];
  }
  const Ctx c{&pr, logits, targets, emb, target_embs, labels, keep, w.data(), group_w, R, w_sum,
              1.0f / pr.tau, pr.tau * pr.tau, pr.lam_ce / nvalid[0], ce, kl, emb_terms,
              grad_logits, grad_emb};
  const RowsFn<EL, EE> rows = pick_rows<EL, EE>();
  constexpr int64_t kRowsPerChunk = kLanes;  // block_logits takes a chunk at once
  const int64_t chunks = (R + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel num_threads(num_threads) if (chunks > 1)
  {
    const int64_t nblk = K <= kSmallK ? 4 * K * kLanes : 0;
    std::vector<float> buf(3 * K + std::max(K, D) + 2 * D + nblk);
    const Scratch sc{buf.data(), buf.data() + K, buf.data() + 2 * K, buf.data() + 3 * K,
                     buf.data() + 3 * K + std::max(K, D), buf.data() + 3 * K + std::max(K, D) + D,
                     nblk > 0 ? buf.data() + 3 * K + std::max(K, D) + 2 * D : nullptr};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < chunks; ++i)
      rows(c, i * kRowsPerChunk, std::min(R, (i + 1) * kRowsPerChunk), sc);
  }
}

// The (logits dtype, embedding dtype) instance of run() for pr's dtypes.
template <class EL>
auto pick_run_emb(const CifdLossProblem& pr) {
  switch (pr.emb_dtype) {
    case EbDtype::kFloat16: return &run<EL, density::F16>;
    case EbDtype::kBFloat16: return &run<EL, density::BF16>;
    default: return &run<EL, density::F32>;
  }
}

auto pick_run(const CifdLossProblem& pr) {
  switch (pr.logits_dtype) {
    case EbDtype::kFloat16: return pick_run_emb<density::F16>(pr);
    case EbDtype::kBFloat16: return pick_run_emb<density::BF16>(pr);
    default: return pick_run_emb<density::F32>(pr);
  }
}

}  // namespace

void cifd_loss_fwd(const CifdLossProblem& pr, const void* logits, const void* targets,
                   const int64_t* labels, const void* emb, const void* target_embs,
                   const float* lam, const uint8_t* keep, const float* nvalid,
                   const float* group_w, float* ce, float* kl, float* emb_terms,
                   void* grad_logits, void* grad_emb, int num_threads) {
  if (pr.B == 0 || pr.G == 0) return;
  pick_run(pr)(pr, logits, targets, labels, emb, target_embs, lam, keep, nvalid, group_w, ce, kl,
               emb_terms, grad_logits, grad_emb, num_threads);
}

}  // namespace cpu
}  // namespace cifd
