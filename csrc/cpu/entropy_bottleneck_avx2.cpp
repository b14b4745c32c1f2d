// SPDX-License-Identifier: Apache-2.0
// AVX2 + FMA hot loops of the CPU entropy bottleneck: 8 float32 lanes per step,
// the density math of entropy_bottleneck_lanes.h over cifd::vec::F8, Philox 8
// counters at a time (cifd/vecmath.h). Compiled for AVX2 by the pragma below
// whatever the build's -march, and entered only after eb_avx2::available()
// (entropy_bottleneck.cpp); on other compilers or CPUs the baseline loops run.
//
// Rounding: the build has -ffp-contract=off, so the noise path's a*b and a+b
// stay separately rounded (y_hat bit-exact against the reference); the density
// uses explicit FMAs.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cifd/density.h"
#include "cifd/kernels.h"
#include "cifd/philox.h"
#include "entropy_bottleneck_avx2.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CIFD_EB_AVX2_BUILT 1
#endif

// Baseline code: safe to call on any CPU.
bool cifd::cpu::eb_avx2::available() {
#ifdef CIFD_EB_AVX2_BUILT
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#ifdef CIFD_EB_AVX2_BUILT
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// Pre-register-allocation scheduling (off by default on x86) interleaves the
// independent tanh chains of a block: about 8% fewer cycles on Zen 3.
#pragma GCC optimize("schedule-insns", "sched-pressure")
#define CIFD_VECMATH_AVX2 1
#include "cifd/vecmath.h"
#include "entropy_bottleneck_lanes.h"
#endif

namespace cifd {
namespace cpu {
namespace eb_avx2 {

#ifdef CIFD_EB_AVX2_BUILT
namespace {

using namespace cifd::vec;
using density::kDequantize;
using density::kMedianRow;
using density::kNoise;

// Lanes l < n set.
inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Up to 8 floats (n >= 8: all 8); lanes past n read as 0, never touching memory.
inline F8 load_n(const float* p, int64_t n) {
  return n >= 8 ? F8::load(p) : F8(_mm256_maskload_ps(p, lane_mask(n)));
}

inline void store_n(float* p, F8 v, int64_t n) {
  if (n >= 8) {
    v.store(p);
  } else {
    _mm256_maskstore_ps(p, lane_mask(n), v.v);
  }
}

template <int MODE>
void yhat_impl(const EbProblem& pr, uint64_t ctr0, int64_t count, const float* y,
               const float* med, float* yh, float* keep) {
  const uint32_t k0 = static_cast<uint32_t>(pr.seed), k1 = static_cast<uint32_t>(pr.seed >> 32);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t l = 0; l < count; l += 8) {
    const int64_t n = count - l;
    const __m256 yv = load_n(y + l, n).v;
    __m256 v = yv, kp = one;
    if (MODE == kNoise) {
      const PhiloxW01 w = philox8_w01(ctr0 + static_cast<uint64_t>(l), k0, k1);
      const __m256 u = _mm256_sub_ps(uint_to_uniform8(w.w0), _mm256_set1_ps(0.5f));
      const __m256 kmask =
          _mm256_cmp_ps(uint_to_uniform8(w.w1), _mm256_set1_ps(pr.rho), _CMP_GE_OQ);
      const __m256 val = _mm256_add_ps(yv, _mm256_mul_ps(_mm256_set1_ps(pr.s), u));  // s*u, then + y
      v = _mm256_and_ps(val, kmask);  // dropped: +0.0 (a select, as the reference's where)
      kp = _mm256_and_ps(one, kmask);
    } else if (MODE == kDequantize) {
      const __m256 m = load_n(med + l, n).v;
      v = _mm256_add_ps(
          _mm256_round_ps(_mm256_sub_ps(yv, m), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m);
    }
    store_n(yh + l, F8(v), n);
    store_n(keep + l, F8(kp), n);
  }
}

// Vectors per block (see entropy_bottleneck_lanes.h): 8 x 2 logits x 3 units = 48
// independent tanh chains per layer (4 vectors measured ~5% slower, 1 ~30%).
constexpr int kG = 8;
constexpr int64_t kBlock = 8 * kG;

// Splits [0, count) into blocks of kG vectors while whole ones fit, then one of
// 4, one of 2 and single vectors for the rest: a span of C = 32 channels costs 4
// vectors, not a padded block of 8 (which made the IBM's [B, 32] run at half
// speed). Vectors are visited in the same order whatever the split, and lanes
// past count contribute exact zeros, so the split never changes a bit.
template <class Block>
inline void for_blocks(int64_t count, Block&& block) {
  int64_t l0 = 0;
  for (; count - l0 >= kBlock; l0 += kBlock) block.template run<kG>(l0);
  if (count - l0 >= 32) {
    block.template run<4>(l0);
    l0 += 32;
  }
  if (count - l0 >= 16) {
    block.template run<2>(l0);
    l0 += 16;
  }
  for (; l0 < count; l0 += 8) block.template run<1>(l0);
}

template <int MODE>
struct BwdBlock {
  int64_t count;
  float bound, grate_n;
  const float *yh, *keep, *gyh, *glik;
  float* gy;
  const float* p;
  int64_t ps;
  float* acc;
  int64_t as;

  template <int G>
  void run(int64_t l0) const {
    const F8 zero(0.0f);
    F8 y[G], kept[G], gl[G], dy[G];
    // Lanes past count read as 0 (keep = g_lik = 0): every contribution to acc is 0.
    for (int g = 0; g < G; ++g) {
      const int64_t l = l0 + 8 * g, n = count - l;
      y[g] = load_n(yh + l, n);
      kept[g] = load_n(keep + l, n);
      gl[g] = load_n(glik + l, n);
    }
    lanes::block_backward<F8, G>(y, kept, gl, F8(grate_n), F8(bound), p + l0, ps, acc + l0, as,
                                 dy);
    for (int g = 0; g < G; ++g) {
      const int64_t l = l0 + 8 * g, n = count - l;
      const F8 gt = dy[g] + load_n(gyh + l, n);
      F8 out = gt;
      if (MODE == kNoise) {
        out = select(kept[g] != zero, gt, zero);
      } else if (MODE == kDequantize) {
        lanes::acc_add<F8>(acc + l0, as, g, kMedianRow, gt);
        out = zero;
      }
      store_n(gy + l, out, n);
    }
  }
};

template <int MODE>
void bwd_impl(int64_t count, float bound, float grate_n, const float* yh, const float* keep,
              const float* gyh, const float* glik, float* gy, const float* p, int64_t ps,
              float* acc, int64_t as) {
  for_blocks(count, BwdBlock<MODE>{count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as});
}

struct FwdBlock {
  int64_t count;
  float bound;
  const float *yh, *keep;
  float* lik;
  const float* p;
  int64_t ps;
  __m256d *s0, *s1;

  template <int G>
  void run(int64_t l0) const {
    F8 y[G], kept[G], lk[G], nll[G];
    for (int g = 0; g < G; ++g) {
      const int64_t l = l0 + 8 * g, n = count - l;
      y[g] = load_n(yh + l, n);
      kept[g] = load_n(keep + l, n);  // 0 past count: nll = 0 there
    }
    lanes::block_forward<F8, G>(y, kept, F8(bound), p + l0, ps, lk, nll);
    for (int g = 0; g < G; ++g) {
      const int64_t l = l0 + 8 * g;
      store_n(lik + l, lk[g], count - l);
      *s0 = _mm256_add_pd(*s0, _mm256_cvtps_pd(_mm256_castps256_ps128(nll[g].v)));
      *s1 = _mm256_add_pd(*s1, _mm256_cvtps_pd(_mm256_extractf128_ps(nll[g].v, 1)));
    }
  }
};

}  // namespace

void yhat_span(const EbProblem& pr, uint64_t ctr0, int64_t count, const float* y,
               const float* med, float* yh, float* keep) {
  switch (pr.mode) {
    case kNoise: yhat_impl<kNoise>(pr, ctr0, count, y, med, yh, keep); break;
    case kDequantize: yhat_impl<kDequantize>(pr, ctr0, count, y, med, yh, keep); break;
    default: yhat_impl<density::kNone>(pr, ctr0, count, y, med, yh, keep); break;
  }
}

double fwd_span(int64_t count, float bound, const float* yh, const float* keep, float* lik,
                const float* p, int64_t ps) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for_blocks(count, FwdBlock{count, bound, yh, keep, lik, p, ps, &s0, &s1});
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(s0, s1));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

void bwd_span(int mode, int64_t count, float bound, float grate_n, const float* yh,
              const float* keep, const float* gyh, const float* glik, float* gy, const float* p,
              int64_t ps, float* acc, int64_t as) {
  switch (mode) {
    case kNoise:
      bwd_impl<kNoise>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);
      break;
    case kDequantize:
      bwd_impl<kDequantize>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);
      break;
    default:
      bwd_impl<density::kNone>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);
      break;
  }
}

#else  // no AVX2 build: available() is false and these are never called

void yhat_span(const EbProblem&, uint64_t, int64_t, const float*, const float*, float*, float*) {}
double fwd_span(int64_t, float, const float*, const float*, float*, const float*, int64_t) {
  return 0.0;
}
void bwd_span(int, int64_t, float, float, const float*, const float*, const float*, const float*,
              float*, const float*, int64_t, float*, int64_t) {}

#endif

}  // namespace eb_avx2
}  // namespace cpu
}  // namespace cifd

#ifdef CIFD_EB_AVX2_BUILT
#pragma GCC pop_options
#endif
