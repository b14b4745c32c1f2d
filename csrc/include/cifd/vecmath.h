// SPDX-License-Identifier: Apache-2.0
// CPU-only vector math for the entropy-bottleneck kernels: an 8-lane float type
// (AVX2 + FMA) with branch-free exp, log and tanh, a vectorised Philox4x32-10,
// and a 1-lane double type with the same interface (std:: functions) for the
// float64 kernels. The CUDA kernels do not include this file.
//
// Using it: the F8 part is compiled only where CIFD_VECMATH_AVX2 is defined, by
// a translation unit that has switched g++ to AVX2 + FMA code generation
// (`#pragma GCC target("avx2,fma")`; in C++ that pragma does not define
// __AVX2__, hence the explicit switch) and whose callers check the CPU at run
// time (csrc/cpu/entropy_bottleneck_avx2.cpp, csrc/tests/test_vecmath.cpp). Everything
// here has internal linkage (an unnamed namespace), so the AVX2 and baseline
// translation units never share an out-of-line copy of a function.
//
// The algorithms and coefficients are density.h's exp_f / log_f / tanh_f
// (errors within 2 ulp on their ranges; csrc/tests/test_vecmath.cpp checks these
// vector versions against std:: over wide ranges, extremes, inf and NaN). The
// noise path (Philox -> uniform -> y + s*u) rounds every step on its own, as the
// reference does, so y_hat stays bit-exact; everything after it may use FMAs.
#pragma once
#include <cmath>
#include <cstdint>

#include "cifd/philox.h"

// Everything is forced inline: the kernels' loops must see straight-line code
// (an out-of-line call would pass the MLP state through memory).
#if defined(__GNUC__)
#define CIFD_VINLINE inline __attribute__((always_inline))
#else
#define CIFD_VINLINE inline
#endif

namespace cifd {
namespace vec {
namespace {

// ------------------------------------------------------------------ double, 1 lane
// The float64 kernels' element type: plain double arithmetic and libm, so that
// float64 gradcheck sees the exact math (the float polynomials would not do).
struct D1 {
  using T = double;
  static constexpr int kLanes = 1;
  double v;
  D1() = default;
  D1(double x) : v(x) {}  // NOLINT: broadcast, as F8's
  static CIFD_VINLINE D1 load(const double* p) { return D1(*p); }
  void store(double* p) const { *p = v; }
};
struct B1 {
  bool m;
};
CIFD_VINLINE D1 operator+(D1 a, D1 b) { return D1(a.v + b.v); }
CIFD_VINLINE D1 operator-(D1 a, D1 b) { return D1(a.v - b.v); }
CIFD_VINLINE D1 operator*(D1 a, D1 b) { return D1(a.v * b.v); }
CIFD_VINLINE D1 operator/(D1 a, D1 b) { return D1(a.v / b.v); }
CIFD_VINLINE D1 operator-(D1 a) { return D1(-a.v); }
CIFD_VINLINE D1 fmadd(D1 a, D1 b, D1 c) { return D1(a.v * b.v + c.v); }  // a*b + c
CIFD_VINLINE D1 fnmadd(D1 a, D1 b, D1 c) { return D1(c.v - a.v * b.v); }  // c - a*b
CIFD_VINLINE D1 vabs(D1 a) { return D1(std::fabs(a.v)); }
CIFD_VINLINE B1 operator>(D1 a, D1 b) { return B1{a.v > b.v}; }
CIFD_VINLINE B1 operator>=(D1 a, D1 b) { return B1{a.v >= b.v}; }
CIFD_VINLINE B1 operator<(D1 a, D1 b) { return B1{a.v < b.v}; }
CIFD_VINLINE B1 operator!=(D1 a, D1 b) { return B1{a.v != b.v}; }
CIFD_VINLINE B1 operator|(B1 a, B1 b) { return B1{a.m || b.m}; }
CIFD_VINLINE B1 operator&(B1 a, B1 b) { return B1{a.m && b.m}; }
CIFD_VINLINE D1 select(B1 m, D1 a, D1 b) { return m.m ? a : b; }
CIFD_VINLINE D1 vexp(D1 a) { return D1(std::exp(a.v)); }
CIFD_VINLINE D1 vlog(D1 a) { return D1(std::log(a.v)); }
CIFD_VINLINE D1 vtanh(D1 a) { return D1(std::tanh(a.v)); }
// max(p, bound) with NaN kept (torch.clamp_min)
CIFD_VINLINE D1 clamp_min(D1 p, D1 bound) { return D1(p.v < bound.v ? bound.v : p.v); }
CIFD_VINLINE double hsum(D1 a) { return a.v; }

}  // namespace
}  // namespace vec
}  // namespace cifd

#if defined(CIFD_VECMATH_AVX2)
#include <immintrin.h>

namespace cifd {
namespace vec {
namespace {

// ------------------------------------------------------------------ float, 8 lanes
struct F8 {
  using T = float;
  static constexpr int kLanes = 8;
  __m256 v;
  F8() = default;
  F8(__m256 x) : v(x) {}          // NOLINT
  F8(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT: broadcast
  static CIFD_VINLINE F8 load(const float* p) { return F8(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
struct M8 {  // lane mask: all ones / all zeros per lane
  __m256 m;
};
CIFD_VINLINE F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
CIFD_VINLINE F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
CIFD_VINLINE F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
CIFD_VINLINE F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
CIFD_VINLINE F8 operator-(F8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
CIFD_VINLINE F8 fmadd(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
CIFD_VINLINE F8 fnmadd(F8 a, F8 b, F8 c) { return _mm256_fnmadd_ps(a.v, b.v, c.v); }
CIFD_VINLINE F8 vabs(F8 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
CIFD_VINLINE F8 vmin(F8 a, F8 b) { return _mm256_min_ps(a.v, b.v); }  // b if either is NaN
CIFD_VINLINE F8 vmax(F8 a, F8 b) { return _mm256_max_ps(a.v, b.v); }
CIFD_VINLINE M8 operator>(F8 a, F8 b) { return M8{_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
CIFD_VINLINE M8 operator>=(F8 a, F8 b) { return M8{_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
CIFD_VINLINE M8 operator<(F8 a, F8 b) { return M8{_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
CIFD_VINLINE M8 operator!=(F8 a, F8 b) { return M8{_mm256_cmp_ps(a.v, b.v, _CMP_NEQ_UQ)}; }
CIFD_VINLINE M8 operator|(M8 a, M8 b) { return M8{_mm256_or_ps(a.m, b.m)}; }
CIFD_VINLINE M8 operator&(M8 a, M8 b) { return M8{_mm256_and_ps(a.m, b.m)}; }
CIFD_VINLINE F8 select(M8 m, F8 a, F8 b) { return _mm256_blendv_ps(b.v, a.v, m.m); }
CIFD_VINLINE F8 clamp_min(F8 p, F8 bound) {  // p < bound ? bound : p (NaN stays NaN)
  return select(p < bound, bound, p);
}
CIFD_VINLINE double hsum(F8 a) {  // lanes summed in double, in a fixed order
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a.v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a.v, 1));
  const __m256d s = _mm256_add_pd(lo, hi);
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

// exp_f's algorithm: exp(x) = 2^k exp(r), r = x - k ln2 (two-part ln2), exp(r) =
// 1 + r + r^2 P(r); 2^k applied as two factors so subnormal results round once.
// x < -104 -> 0, x > 89 -> inf, NaN -> NaN.
CIFD_VINLINE F8 vexp(F8 xin) {
  // max/min return their second operand when the first is NaN: keep NaN by
  // putting x first and blending it back.
  __m256 x = _mm256_max_ps(xin.v, _mm256_set1_ps(-104.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(89.0f));
  const __m256 kMagic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269502f), kMagic);
  const __m256 kf = _mm256_sub_ps(t, kMagic);
  const __m256i k = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(kMagic));
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(0.00138146046f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.00836871099f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.0416683890f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166665211f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.499999940f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i k1 = _mm256_srai_epi32(k, 1);
  const __m256i k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  const __m256 res = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return _mm256_blendv_ps(res, xin.v, _mm256_cmp_ps(xin.v, xin.v, _CMP_UNORD_Q));
}

// log_f's algorithm: log(x) = e ln2 + 2 atanh(s), s = (m - 1)/(m + 1), m in
// [sqrt(1/2), sqrt(2)). Subnormals scaled by 2^23 first; log(0) = -inf, log(x<0)
// = NaN, log(inf) = inf, log(NaN) = NaN.
CIFD_VINLINE F8 vlog(F8 xin) {
  const __m256 x = xin.v;
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(8388608.0f)), tiny);
  const __m256i u = _mm256_castps_si256(xs);
  const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(u, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(u, _mm256_slli_epi32(e, 23)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 r = _mm256_set1_ps(0.298709571f);
  r = _mm256_fmadd_ps(r, z, _mm256_set1_ps(0.399775743f));
  r = _mm256_fmadd_ps(r, z, _mm256_set1_ps(0.666667759f));
  const __m256 lm = _mm256_fmadd_ps(_mm256_mul_ps(s, z), r, _mm256_add_ps(s, s));
  const __m256 ef = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(e, _mm256_and_si256(_mm256_castps_si256(tiny), _mm256_set1_epi32(23))));
  const __m256 res = _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693145752f),
                                     _mm256_fmadd_ps(ef, _mm256_set1_ps(1.42860677e-06f), lm));
  const __m256 zero = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(INFINITY);
  // special lanes: 0 -> -inf, < 0 -> NaN, inf and NaN as they are
  __m256 special = _mm256_blendv_ps(x, _mm256_set1_ps(NAN), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
  special = _mm256_blendv_ps(special, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x, zero, _CMP_EQ_OQ));
  const __m256 finite_pos = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ),
                                          _mm256_cmp_ps(x, inf, _CMP_LT_OQ));
  return _mm256_blendv_ps(special, res, finite_pos);
}

// tanh_f's rational: x P(x^2) / Q(x^2), x clamped to [-8, 8]. As tanh_f, NaN
// gives tanh(8) (min/max return their second operand for NaN); in the MLP a NaN
// still reaches the output through q in h = q + A tanh(q).
CIFD_VINLINE F8 vtanh(F8 xin) {
  __m256 x = _mm256_min_ps(xin.v, _mm256_set1_ps(8.0f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-8.0f));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(1.33544518e-08f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06090808e-05f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.00349559542f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(0.133810341f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f));
  __m256 q = _mm256_set1_ps(7.77651564e-07f);
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(0.000328564143f));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(0.0258770175f));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(0.467143506f));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(1.0f));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

// ------------------------------------------------------------------ Philox, 8 lanes
// philox4x32_10 for 8 counters at once. Each word lives in the low halves of the
// 64-bit lanes of two vectors (4 counters each), so _mm256_mul_epu32 gives the
// full 32x32->64 product directly: lo in the low half, hi after a 64-bit shift.
// Upper halves hold garbage that never reaches a low half (mul_epu32 reads low
// halves only, xor is lane-wise, and the hi shift brings in the product's own
// upper half). Lane order: vector A holds elements {0, 1, 4, 5}, B {2, 3, 6, 7},
// so that _mm256_shuffle_ps(A, B, (2,0,2,0)) yields elements 0..7 in order.
struct PhiloxW01 {
  __m256i w0, w1;  // words 0 and 1 of the 8 counters, in element order
};

CIFD_VINLINE __m256i philox_pack_low(__m256i a, __m256i b) {
  return _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0)));
}

// Counters ctr + l, l = 0..7 (64-bit, carry included); key (k0, k1).
CIFD_VINLINE PhiloxW01 philox8_w01(uint64_t ctr, uint32_t k0, uint32_t k1) {
  const __m256i base = _mm256_set1_epi64x(static_cast<long long>(ctr));
  const __m256i ca = _mm256_add_epi64(base, _mm256_setr_epi64x(0, 1, 4, 5));
  const __m256i cb = _mm256_add_epi64(base, _mm256_setr_epi64x(2, 3, 6, 7));
  const __m256i mA = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i mB = _mm256_set1_epi64x(kPhiloxRoundB);
  __m256i c0[2] = {ca, cb};
  __m256i c1[2] = {_mm256_srli_epi64(ca, 32), _mm256_srli_epi64(cb, 32)};
  __m256i c2[2], c3[2];
  uint32_t ka = k0, kb = k1;
  // Round 1 with c2 = c3 = 0: hi_b = lo_b = 0.
  {
    const __m256i K0 = _mm256_set1_epi32(static_cast<int>(ka));
    const __m256i K1 = _mm256_set1_epi32(static_cast<int>(kb));
    for (int h = 0; h < 2; ++h) {
      const __m256i pa = _mm256_mul_epu32(c0[h], mA);
      c0[h] = _mm256_xor_si256(c1[h], K0);
      c2[h] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), K1);
      c1[h] = _mm256_setzero_si256();
      c3[h] = pa;
    }
    ka += kPhiloxKeyA;
    kb += kPhiloxKeyB;
  }
  for (int r = 1; r < kPhiloxRounds; ++r) {
    const __m256i K0 = _mm256_set1_epi32(static_cast<int>(ka));
    const __m256i K1 = _mm256_set1_epi32(static_cast<int>(kb));
    for (int h = 0; h < 2; ++h) {
      const __m256i pb = _mm256_mul_epu32(c2[h], mB);
      const __m256i pa = _mm256_mul_epu32(c0[h], mA);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[h]), K0);
      c2[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[h]), K1);
      c1[h] = pb;
      c3[h] = pa;
    }
    ka += kPhiloxKeyA;
    kb += kPhiloxKeyB;
  }
  return PhiloxW01{philox_pack_low(c0[0], c0[1]), philox_pack_low(c1[0], c1[1])};
}

// uint_to_uniform on 8 words: bit-cast to int32, negatives by NOT, to float
// (round to nearest even), times the scale: separately rounded steps.
CIFD_VINLINE __m256 uint_to_uniform8(__m256i w) {
  const __m256i i = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(kUniformScale));
}

}  // namespace
}  // namespace vec
}  // namespace cifd
#endif  // CIFD_VECMATH_AVX2
