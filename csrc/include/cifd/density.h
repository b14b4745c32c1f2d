// SPDX-License-Identifier: Apache-2.0
// The factorized entropy model's per-element math (docs/METHOD.md sections 1, 3,
// 6), shared by the CPU and CUDA entropy-bottleneck kernels: one copy of each
// formula.
//
//   y_hat = keep ? y + s*u : 0          noise (u, keep from Philox words 0, 1)
//           the density is read at x = y_hat / s (noise mode; the unit-width
//           channel's rate of y / s, docs/METHOD.md section 3), dx/dy_hat = 1/s
//         = rne(y - m) + m              dequantize
//         = y                           none
//   f(x): h = W_k h + b_k; h += tanh(a)_k * tanh(h) (k < 4); widths 1-3-3-3-3-1
//   p = |sigmoid(g f(y_hat + 1/2)) - sigmoid(g f(y_hat - 1/2))|, g = -sign(sum)
//   p_b = max(p, bound), LowerBound gradient rule.
//
// Parameters come packed per channel (cifd_kernels/ops/density_pack.py): the
// element's channel's row r is p[r * ps]; gradients accumulate into
// acc[r * as]. On the CPU p and acc point into [rows, channels] tiles, so a
// `#pragma omp simd` loop over channels (or positions) reads and writes whole
// vectors; on the GPU acc is a register array (as = 1).
//
// Everything here is branch-free selects over float/uint32 so that g++
// vectorises it: exp/log are polynomials, tanh a rational function
// (coefficients fitted for this file by weighted least squares; accuracy
// checked by csrc/tests/test_density.cpp). Host builds must not contract a*b + c into an
// FMA (-ffp-contract=off, set by setup.py and CMakeLists.txt): y_hat is
// bit-exact against the reference only with separately rounded steps. On the
// device mul_rn/add_rn pin those steps; nvcc may contract the rest.
#pragma once
#include <cstdint>
#include <cstring>

#include "cifd/kernels.h"
#include "cifd/macros.h"
#include "cifd/philox.h"

// Host: force inlining so the omp simd loops see straight-line code.
#if defined(__CUDACC__)
#define CIFD_HDI __host__ __device__ __forceinline__
#define CIFD_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define CIFD_HDI inline __attribute__((always_inline))
#define CIFD_UNROLL _Pragma("GCC unroll 16")
#else
#define CIFD_HDI inline
#define CIFD_UNROLL
#endif

namespace cifd {
namespace density {

// ------------------------------------------------------------------ packed layout
constexpr int kNumPacked = 58;  // rows of the packed parameters
constexpr int kNumGrad = 59;    // + the medians' gradient row
constexpr int kMedianRow = 58;
// layer 0 (1 -> 3): W[j], b[j], tanh(a)[j]
constexpr int kW0 = 0, kB0 = 3, kA0 = 6;
// hidden layer k = 1..3: W[j][i] at base + 3j + i, b[j] base + 9 + j, tanh(a)[j] base + 12 + j
template <int K>
struct Hidden {
  static_assert(K >= 1 && K <= 3, "hidden layers are 1..3");
  static constexpr int W = 9 + 15 * (K - 1), B = W + 9, A = W + 12;
};
// layer 4 (3 -> 1): W[i], b
constexpr int kW4 = 54, kB4 = 57;

enum Mode : int { kNoise = 0, kDequantize = 1, kNone = 2 };

// ------------------------------------------------------------------ bits, rounding
CIFD_HDI uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

CIFD_HDI float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// a*b and a+b each rounded once (never fused with a neighbouring op).
CIFD_HDI float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

CIFD_HDI float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a / b rounded once (IEEE), as torch's division: the density's point y_hat / s.
CIFD_HDI float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

CIFD_HDI float abs_f(float x) { return u2f(f2u(x) & 0x7fffffffu); }

// torch.round in float32: ties to even, sign kept (-0.3 -> -0.0), |t| >= 2^23,
// inf and NaN returned as they are.
CIFD_HDI float round_half_even(float t) {
#if defined(__CUDA_ARCH__)
  return rintf(t);
#else
  const float a = abs_f(t);
  const float r = (a + 8388608.0f) - 8388608.0f;  // exact for a < 2^23 (ulp of a + 2^23 is 1)
  const float signed_r = u2f(f2u(r) | (f2u(t) & 0x80000000u));
  return a < 8388608.0f ? signed_r : t;
#endif
}

// ------------------------------------------------------------------ storage types
// float16 / bfloat16 <-> float32, round to nearest even, NaN kept quiet. Bit
// arithmetic only, so the same code runs (and vectorises) everywhere.
CIFD_HDI float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa in float position
  const uint32_t exp = em & 0x0f800000u;
  const float normal = u2f(em + 0x38000000u);             // rebias 15 -> 127
  const float special = u2f(em + 0x70000000u);            // inf / NaN: exponent all ones
  const float sub = u2f(em + 0x38800000u) - 6.103515625e-05f;  // subnormal: (1.m - 1) * 2^-14
  const float mag = exp == 0x0f800000u ? special : (exp == 0 ? sub : normal);
  return u2f(f2u(mag) | sign);
}

CIFD_HDI uint16_t float_to_half(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  // normal half: rebias and round the 13 dropped mantissa bits to nearest even
  const uint32_t rb = ax - 0x38000000u;
  const uint32_t normal = (rb + 0x0fffu + ((rb >> 13) & 1u)) >> 13;
  // subnormal half: adding 0.5 puts the half's mantissa in the low bits, rounded by the FPU
  const uint32_t sub = f2u(u2f(ax) + 0.5f) - 0x3f000000u;
  const uint32_t naninf = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t mag = ax >= 0x477ff000u ? naninf  // >= 65520 rounds to inf (and inf, NaN)
                       : (ax < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(mag | sign);
}

CIFD_HDI float bf16_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }

CIFD_HDI uint16_t float_to_bf16(float f) {
  const uint32_t b = f2u(f);
  const uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? nan : r);
}

// Element types of y, y_hat, grad_y_hat, grad_y: float32, float16, bfloat16.
struct F32 {
  using T = float;
  static CIFD_HDI float load(T v) { return v; }
  static CIFD_HDI T store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static CIFD_HDI float load(T v) { return half_to_float(v); }
  static CIFD_HDI T store(float v) { return float_to_half(v); }
};
struct BF16 {
  using T = uint16_t;
  static CIFD_HDI float load(T v) { return bf16_to_float(v); }
  static CIFD_HDI T store(float v) { return float_to_bf16(v); }
};

// Host-side dispatch: f(F32{}), f(F16{}) or f(BF16{}) for a storage dtype.
template <class F>
inline void by_dtype(EbDtype dt, F&& f) {
  switch (dt) {
    case EbDtype::kFloat16: f(F16{}); break;
    case EbDtype::kBFloat16: f(BF16{}); break;
    default: f(F32{}); break;
  }
}

// ------------------------------------------------------------------ exp, log, tanh
// 1 / b where b is known to lie in [1, 2^126]: IEEE division on the host; on the
// GPU the SFU reciprocal alone (rcp.approx, within 1 ulp; no subnormal can occur
// for such b, so .ftz changes nothing) instead of div.rn's multi-instruction
// sequence with its slow-path branch. __fdividef(a, b) is a * rcp.approx(b) plus
// a guard for |b| > 2^126 (a compare and two predicated multiplies), which such b
// never needs.
CIFD_HDI float rcp_q(float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return r;
#else
  return 1.0f / b;
#endif
}

// a / b for b in [1, 2^126]: IEEE on the host, a * rcp_q(b) on the GPU (within 2
// ulp). Used by tanh_f, whose Q(x^2) >= 1, and by log_f (m + 1 in [1.7, 2.5]).
CIFD_HDI float div_q(float a, float b) {
#ifdef __CUDA_ARCH__
  return a * rcp_q(b);
#else
  return a / b;
#endif
}

// exp(x) = 2^k exp(r), k = rne(x / ln 2), r = x - k ln 2 in [-ln2/2, ln2/2],
// exp(r) = 1 + r + r^2 P(r) (relative error of P's fit 3e-9). 2^k is applied as
// two factors so subnormal results round once. Below -104 the result is 0,
// above 89 inf; NaN propagates (the clamps compare false for NaN).
CIFD_HDI float exp_f(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269502f + kMagic;
  const float kf = t - kMagic;
  const int32_t k = static_cast<int32_t>(f2u(t) - f2u(kMagic));
  float r = x - kf * 0.693145752f;  // ln 2 split: the high part has 16 bits, so kf * hi is exact
  r = r - kf * 1.42860677e-06f;
  float p = 0.00138146046f;
  p = p * r + 0.00836871099f;
  p = p * r + 0.0416683890f;
  p = p * r + 0.166665211f;
  p = p * r + 0.499999940f;
  p = (p * r) * r + r + 1.0f;
  const int32_t k1 = k >> 1;  // arithmetic shift; k in [-150, 129]
  const int32_t k2 = k - k1;
  const float s1 = u2f(static_cast<uint32_t>(k1 + 127) << 23);
  const float s2 = u2f(static_cast<uint32_t>(k2 + 127) << 23);
  return (p * s1) * s2;
}

// log(x) = e ln 2 + log(m), m = x / 2^e in [sqrt(1/2), sqrt(2)), log(m) =
// 2 atanh(s) = 2s + s^3 R(s^2), s = (m - 1) / (m + 1), |s| <= 0.1716 (fit error
// 8e-10). Subnormals are scaled up first; log(0) = -inf, log(x < 0) = NaN.
CIFD_HDI float log_f(float x) {
  const bool tiny = x < 1.17549435e-38f;
  const float xs = tiny ? x * 8388608.0f : x;  // * 2^23
  const uint32_t u = f2u(xs);
  const int32_t e = static_cast<int32_t>(u - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = sqrt(1/2)
  const float m = u2f(u - (static_cast<uint32_t>(e) << 23));
  const float f = m - 1.0f;
  const float s = div_q(f, m + 1.0f);
  const float z = s * s;
  float r = 0.298709571f;
  r = r * z + 0.399775743f;
  r = r * z + 0.666667759f;
  const float lm = (s * z) * r + 2.0f * s;
  const float ef = static_cast<float>(tiny ? e - 23 : e);
  const float res = ef * 0.693145752f + (lm + ef * 1.42860677e-06f);
  const float inf = u2f(0x7f800000u);
  const float special = x == 0.0f ? -inf : (x < 0.0f ? u2f(0x7fc00000u) : x);  // inf, NaN stay
  const bool finite_pos = x > 0.0f && x < inf;
  return finite_pos ? res : special;
}

// exp(x) for the bin mass's x = -|z| <= 0: exp_f on the host (the CPU's bits); on
// the GPU the SFU's ex2.approx of x log2(e), the Triton kernels' formula (within 2
// ulp of 2^(rounded product): relative error ~1.2e-6 at x = -20, where p nears
// the likelihood bound; results below 2^-126 flush to 0, as Triton's .ftz).
CIFD_HDI float exp_bin(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504f));
  return r;
#else
  return exp_f(x);
#endif
}

// -ln p for a bounded likelihood p: log_f on the host; on the GPU lg2.approx times
// -ln 2 (the SFU; absolute error ~1.7e-7 nats near p = 1, relative 2^-22 below),
// the Triton kernels' formula. NaN stays NaN, 0 gives +inf.
CIFD_HDI float neg_log_lik(float p) {
#ifdef __CUDA_ARCH__
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(p));
  return r * -0.693147182f;
#else
  return -log_f(p);
#endif
}

// tanh(x) = x P(x^2) / Q(x^2), P and Q of degree 4 (fit relative error 2e-8;
// within a few ulp after float32 evaluation), x clamped to [-8, 8], where the
// rational stays below 1 (tanh(8) = 1 - 2.3e-7). One division (a fast one on the
// GPU: div_q; the CPU's bits are the IEEE ones) and no exp: the
// MLP evaluates 12 per logit, so this is the kernels' hottest function. The
// clamps are min/max (one instruction each), so tanh_f(NaN) = tanh_f(8); a NaN
// still reaches the MLP's output through q in h = q + A tanh(q).
CIFD_HDI float tanh_f(float x) {
  x = x < 8.0f ? x : 8.0f;
  x = x > -8.0f ? x : -8.0f;
  const float z = x * x;
  float p = 1.33544518e-08f;
  p = p * z + 2.06090808e-05f;
  p = p * z + 0.00349559542f;
  p = p * z + 0.133810341f;
  p = p * z + 1.0f;
  float q = 7.77651564e-07f;
  q = q * z + 0.000328564143f;
  q = q * z + 0.0258770175f;
  q = q * z + 0.467143506f;
  q = q * z + 1.0f;
  return div_q(x * p, q);
}

// ------------------------------------------------------------------ the density MLP
// What the backward pass needs of one logit's forward: the input and, per
// hidden layer, tanh(q) and the layer's output h.
struct MlpState {
  float x;
  float t[4][3];
  float h[4][3];
};

// f(x), keeping the state for mlp_backward_pair.
CIFD_HDI float mlp_forward(float x, const float* p, int64_t ps, MlpState& st) {
  st.x = x;
  CIFD_UNROLL
  for (int j = 0; j < 3; ++j) {
    const float q = p[(kW0 + j) * ps] * x + p[(kB0 + j) * ps];
    const float t = tanh_f(q);
    st.t[0][j] = t;
    st.h[0][j] = q + p[(kA0 + j) * ps] * t;
  }
#define CIFD_HIDDEN_FWD(K)                                                              \
  CIFD_UNROLL                                                                           \
  for (int j = 0; j < 3; ++j) {                                                         \
    const float q = p[(Hidden<K>::W + 3 * j + 0) * ps] * st.h[K - 1][0] +               \
                    p[(Hidden<K>::W + 3 * j + 1) * ps] * st.h[K - 1][1] +               \
                    p[(Hidden<K>::W + 3 * j + 2) * ps] * st.h[K - 1][2] +               \
                    p[(Hidden<K>::B + j) * ps];                                         \
    const float t = tanh_f(q);                                                          \
    st.t[K][j] = t;                                                                     \
    st.h[K][j] = q + p[(Hidden<K>::A + j) * ps] * t;                                    \
  }
  CIFD_HIDDEN_FWD(1)
  CIFD_HIDDEN_FWD(2)
  CIFD_HIDDEN_FWD(3)
#undef CIFD_HIDDEN_FWD
  return p[(kW4 + 0) * ps] * st.h[3][0] + p[(kW4 + 1) * ps] * st.h[3][1] +
         p[(kW4 + 2) * ps] * st.h[3][2] + p[kB4 * ps];
}

// f(x) alone (the forward kernels keep nothing).
CIFD_HDI float mlp_value(float x, const float* p, int64_t ps) {
  MlpState st;
  return mlp_forward(x, p, ps, st);
}

// Back through f for the two logits of one element (lower lo, upper up) with
// upstream gradients gl, gu: adds both contributions to every parameter row
// (acc[r * as] += d/d row r) and returns dL/dx_lo + dL/dx_up.
//   layer: q = W h_in + b, h = q + A tanh(q):
//   dq = dh (1 + A (1 - tanh(q)^2)), dA += dh tanh(q), db += dq, dW += dq h_in^T,
//   dh_in = W^T dq.
CIFD_HDI float mlp_backward_pair(float gl, float gu, const MlpState& lo, const MlpState& up,
                                 const float* p, int64_t ps, float* acc, int64_t as) {
  float dl[3], du[3];
  CIFD_UNROLL
  for (int i = 0; i < 3; ++i) {
    acc[(kW4 + i) * as] += gl * lo.h[3][i] + gu * up.h[3][i];
    dl[i] = p[(kW4 + i) * ps] * gl;
    du[i] = p[(kW4 + i) * ps] * gu;
  }
  acc[kB4 * as] += gl + gu;
#define CIFD_HIDDEN_BWD(K)                                                                   \
  {                                                                                          \
    float ql[3], qu[3];                                                                      \
    CIFD_UNROLL                                                                              \
    for (int j = 0; j < 3; ++j) {                                                            \
      const float aj = p[(Hidden<K>::A + j) * ps];                                           \
      ql[j] = dl[j] * (1.0f + aj * (1.0f - lo.t[K][j] * lo.t[K][j]));                        \
      qu[j] = du[j] * (1.0f + aj * (1.0f - up.t[K][j] * up.t[K][j]));                        \
      acc[(Hidden<K>::A + j) * as] += dl[j] * lo.t[K][j] + du[j] * up.t[K][j];               \
      acc[(Hidden<K>::B + j) * as] += ql[j] + qu[j];                                         \
      CIFD_UNROLL                                                                            \
      for (int i = 0; i < 3; ++i)                                                            \
        acc[(Hidden<K>::W + 3 * j + i) * as] += ql[j] * lo.h[K - 1][i] + qu[j] * up.h[K - 1][i]; \
    }                                                                                        \
    CIFD_UNROLL                                                                              \
    for (int i = 0; i < 3; ++i) {                                                            \
      dl[i] = p[(Hidden<K>::W + i) * ps] * ql[0] + p[(Hidden<K>::W + 3 + i) * ps] * ql[1] +  \
              p[(Hidden<K>::W + 6 + i) * ps] * ql[2];                                        \
      du[i] = p[(Hidden<K>::W + i) * ps] * qu[0] + p[(Hidden<K>::W + 3 + i) * ps] * qu[1] +  \
              p[(Hidden<K>::W + 6 + i) * ps] * qu[2];                                        \
    }                                                                                        \
  }
  CIFD_HIDDEN_BWD(3)
  CIFD_HIDDEN_BWD(2)
  CIFD_HIDDEN_BWD(1)
#undef CIFD_HIDDEN_BWD
  float dx = 0.0f;
  CIFD_UNROLL
  for (int j = 0; j < 3; ++j) {
    const float aj = p[(kA0 + j) * ps];
    const float ql = dl[j] * (1.0f + aj * (1.0f - lo.t[0][j] * lo.t[0][j]));
    const float qu = du[j] * (1.0f + aj * (1.0f - up.t[0][j] * up.t[0][j]));
    acc[(kA0 + j) * as] += dl[j] * lo.t[0][j] + du[j] * up.t[0][j];
    acc[(kB0 + j) * as] += ql + qu;
    acc[(kW0 + j) * as] += ql * lo.x + qu * up.x;
    dx += p[(kW0 + j) * ps] * (ql + qu);
  }
  return dx;
}

// ------------------------------------------------------------------ bin mass, bound
// p = |sigmoid(g U) - sigmoid(g L)|, g = -1 if L + U > 0 else +1 (both logits
// reflected into the lower tail); sigmoid(z) = 1/(1+e) or e/(1+e), e = exp(-|z|).
// With dl, du: dp/dL and dp/dU (g sign(d) sigmoid'(g .), sign(0) = 0 as |.|').
CIFD_HDI float bin_mass(float lo, float up, float* dl = nullptr, float* du = nullptr) {
  const float g = lo + up > 0.0f ? -1.0f : 1.0f;
  const float zl = g * lo, zu = g * up;
  const float el = exp_bin(-abs_f(zl)), eu = exp_bin(-abs_f(zu));
  const float rl = rcp_q(1.0f + el), ru = rcp_q(1.0f + eu);  // 1 + e in [1, 2]
  const float sl = zl >= 0.0f ? rl : el * rl;
  const float su = zu >= 0.0f ? ru : eu * ru;
  const float d = su - sl;
  if (dl != nullptr) {
    const float sd = d > 0.0f ? g : (d < 0.0f ? -g : 0.0f);
    *dl = -sd * (el * rl * rl);
    *du = sd * (eu * ru * ru);
  }
  return abs_f(d);
}

// max(p, bound); NaN stays NaN (as torch.clamp_min).
CIFD_HDI float lower_bound(float p, float bound) { return p < bound ? bound : p; }

// CompressAI's LowerBound gradient: passes where p >= bound or where it pushes p up.
CIFD_HDI float lower_bound_grad(float p, float bound, float g) {
  return (p >= bound || g < 0.0f) ? g : 0.0f;
}

// ------------------------------------------------------------------ y_hat
// The quantisation proxy of one element, in float32, and whether it is kept
// (noise mode with rho > 0 drops elements; other modes keep everything).
// med is read in dequantize mode only. keep is a 0/1 word, not a bool: g++
// keeps a struct with a bool member in memory and then will not vectorise.
struct YHat {
  float value;
  uint32_t keep;
};

// Philox key (k0, k1) = (seed lo, seed hi) and counter (c0, c1) = (ctr lo, ctr
// hi) as 32-bit words: the CPU loops form them lane by lane in 32-bit
// arithmetic, which g++ vectorises (64-bit lanes it does not).
CIFD_HDI YHat y_hat(int mode, float y, float med, uint32_t k0, uint32_t k1, uint32_t c0,
                    uint32_t c1, float rho, float s) {
  if (mode == kNoise) {
    const Philox4 w = philox4x32_10(c0, c1, 0u, 0u, k0, k1);
    const float u = uniform_noise(w.w[0]);
    const bool keep = uint_to_uniform(w.w[1]) >= rho;
    const float v = add_rn(y, mul_rn(s, u));  // s*u rounded first, then the add
    return YHat{keep ? v : 0.0f, keep ? 1u : 0u};
  }
  if (mode == kDequantize) return YHat{add_rn(round_half_even(y - med), med), 1u};
  return YHat{y, 1u};
}

// The same with the 64-bit seed and counter (philox()'s convention).
CIFD_HDI YHat y_hat(int mode, float y, float med, uint64_t seed, uint64_t ctr, float rho, float s) {
  return y_hat(mode, y, med, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
               static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), rho, s);
}

// ------------------------------------------------------------------ one element
// Forward: bounded likelihood p_b of y_hat.
CIFD_HDI float likelihood(float yh, const float* p, int64_t ps, float bound) {
  const float lo = mlp_value(yh - 0.5f, p, ps);
  const float up = mlp_value(yh + 0.5f, p, ps);
  return lower_bound(bin_mass(lo, up), bound);
}

// Backward of the density part of one element: dL/dp_b = g_lik + (kept ?
// -g_rate_n / p_b : 0) (the rate term needs p_b, so it is formed here), then
// LowerBound, the bin mass and the MLP. Returns dL/dy_hat through the
// likelihood; parameter gradients go to acc.
CIFD_HDI float likelihood_backward(float yh, float g_lik, float g_rate_n, bool kept, float bound,
                                   const float* p, int64_t ps, float* acc, int64_t as) {
  MlpState lo, up;
  const float fl = mlp_forward(yh - 0.5f, p, ps, lo);
  const float fu = mlp_forward(yh + 0.5f, p, ps, up);
  float dl, du;
  const float pm = bin_mass(fl, fu, &dl, &du);
  const float pb = lower_bound(pm, bound);
  const float g = lower_bound_grad(pm, bound, g_lik - (kept ? g_rate_n / pb : 0.0f));
  return mlp_backward_pair(g * dl, g * du, lo, up, p, ps, acc, as);
}

// Element rules shared by the kernels (element i: key k0, k1 from the seed,
// counter c0, c1 = offset + i). Results leave through pointers and the return
// value only: a struct or bool local in the caller's omp simd loop would be
// privatised into a per-lane array and stop g++ vectorising.
struct Scalars {
  int mode;
  uint32_t k0, k1;
  float rho, s, bound;
};

// Noise mode with s != 1: the density is read at y_hat / s, and its gradient
// reaches y_hat divided by s. s == 1 (the RDMs, the paper's IBM) skips the
// division, which would be exact anyway.
CIFD_HDI bool scaled_noise(const Scalars& sc) { return sc.mode == kNoise && sc.s != 1.0f; }
CIFD_HDI float density_point(const Scalars& sc, float yh) {
  return scaled_noise(sc) ? div_rn(yh, sc.s) : yh;
}

// Forward: writes y_hat (float32) and p_b; returns -ln p_b if kept, else 0.
CIFD_HDI float element_forward(const Scalars& sc, float y, float med, uint32_t c0, uint32_t c1,
                               const float* p, int64_t ps, float* yh_out, float* lik_out) {
  const YHat q = y_hat(sc.mode, y, med, sc.k0, sc.k1, c0, c1, sc.rho, sc.s);
  *yh_out = q.value;
  const float pb = likelihood(density_point(sc, q.value), p, ps, sc.bound);
  *lik_out = pb;
  return q.keep != 0u ? neg_log_lik(pb) : 0.0f;
}

// dL/dy from gt = g_yhat + dL/dy_hat (through the likelihood):
//   noise: keep ? gt : 0; dequantize: 0, and the median takes gt (acc_med +=;
//   round's gradient is zero and y_hat = rne(y - m) + m); none: gt.
CIFD_HDI float grad_y_rule(int mode, bool keep, float gt, float* acc_med) {
  if (mode == kNoise) return keep ? gt : 0.0f;
  if (mode == kDequantize) {
    *acc_med += gt;
    return 0.0f;
  }
  return gt;
}

// Backward: returns dL/dy (float32) from g_yhat, g_lik and this row's g_rate;
// parameter gradients (and, in dequantize mode, the median's in row 58) go to
// acc[r * as].
CIFD_HDI float element_backward(const Scalars& sc, float y, float med, uint32_t c0, uint32_t c1,
                                float g_yhat, float g_lik, float g_rate_n, const float* p,
                                int64_t ps, float* acc, int64_t as) {
  const YHat q = y_hat(sc.mode, y, med, sc.k0, sc.k1, c0, c1, sc.rho, sc.s);
  const bool keep = q.keep != 0u;
  const float gx = likelihood_backward(density_point(sc, q.value), g_lik, g_rate_n, keep, sc.bound,
                                       p, ps, acc, as);
  const float gt = (scaled_noise(sc) ? div_rn(gx, sc.s) : gx) + g_yhat;
  return grad_y_rule(sc.mode, keep, gt, acc + kMedianRow * as);
}

}  // namespace density
}  // namespace cifd
