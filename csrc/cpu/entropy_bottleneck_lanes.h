// SPDX-License-Identifier: Apache-2.0
// The entropy bottleneck's density math over a lane type V of cifd/vecmath.h:
// F8 (8 float32 lanes, AVX2 + FMA; entropy_bottleneck_avx2.cpp) or D1 (one
// float64 lane; the float64 kernels in entropy_bottleneck.cpp). The formulas
// are cifd/density.h's (docs/METHOD.md section 1), arranged for throughput:
//
// * a block of G lane vectors goes through the MLP layer by layer, both bin
//   edges side by side: 6 G independent tanh chains per layer, enough for the
//   out-of-order core to hide their latency (one vector at a time is
//   latency-bound: ~50 cycles per layer for 6 chains of ~14 instructions);
//   the block's state (tanh(q) and h per layer) lives in a stack array that the
//   backward reads back;
// * the bin mass takes one division: with e = exp(-|z|) and n = (z >= 0 ? 1 : e),
//   sigmoid(z) = n / (1 + e), so
//     p = |n_U (1 + e_L) - n_L (1 + e_U)| / ((1 + e_L)(1 + e_U)),
//   and 1/(1 + e_L), 1/(1 + e_U) for the derivatives come from the same
//   reciprocal (times 1 + e_U, 1 + e_L);
// * parameters are read as lane vectors p[r * ps + g * lanes] (a [58, lanes]
//   tile: per-lane channels, or one channel broadcast), gradients added into
//   acc[r * as + g * lanes].
//
// Only included by csrc/cpu/*.cpp; internal linkage throughout.
#pragma once
#include <cstdint>

#include "cifd/density.h"
#include "cifd/vecmath.h"

namespace cifd {
namespace cpu {
namespace {
namespace lanes {

using density::Hidden;
using density::kA0;
using density::kB0;
using density::kB4;
using density::kMedianRow;
using density::kW0;
using density::kW4;
using namespace cifd::vec;

template <class V>
using Elt = typename V::T;

// Forward state of a block of G lane vectors, two logits each (e = 0: lower
// bin edge, 1: upper): inputs, and per tanh'd layer tanh(q) and the output h.
template <class V, int G>
struct Block {
  V x[G][2];
  V t[G][2][4][3];
  V h[G][2][4][3];
};

template <class V>
CIFD_VINLINE V ld(const Elt<V>* p, int64_t ps, int g, int r) {
  return V::load(p + r * ps + g * V::kLanes);
}

// acc[r] += v for vector g
template <class V>
CIFD_VINLINE void acc_add(Elt<V>* acc, int64_t as, int g, int r, V v) {
  Elt<V>* a = acc + r * as + g * V::kLanes;
  (V::load(a) + v).store(a);
}

// One 3 -> 3 layer (K = 1..3).
template <class V, int G, int K>
CIFD_VINLINE void hidden_fwd(const Elt<V>* p, int64_t ps, Block<V, G>& st) {
  using L = Hidden<K>;
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < 3; ++j) {
      for (int e = 0; e < 2; ++e) {
        const V q = fmadd(ld<V>(p, ps, g, L::W + 3 * j), st.h[g][e][K - 1][0],
                          fmadd(ld<V>(p, ps, g, L::W + 3 * j + 1), st.h[g][e][K - 1][1],
                                fmadd(ld<V>(p, ps, g, L::W + 3 * j + 2), st.h[g][e][K - 1][2],
                                      ld<V>(p, ps, g, L::B + j))));
        const V t = vtanh(q);
        st.t[g][e][K][j] = t;
        st.h[g][e][K][j] = fmadd(ld<V>(p, ps, g, L::A + j), t, q);
      }
    }
  }
}

// f at both edges of every vector: f[g][e], the state into st (st.x set by the caller).
template <class V, int G>
CIFD_VINLINE void mlp_fwd(const Elt<V>* p, int64_t ps, Block<V, G>& st, V (&f)[G][2]) {
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < 3; ++j) {
      for (int e = 0; e < 2; ++e) {
        const V q = fmadd(ld<V>(p, ps, g, kW0 + j), st.x[g][e], ld<V>(p, ps, g, kB0 + j));
        const V t = vtanh(q);
        st.t[g][e][0][j] = t;
        st.h[g][e][0][j] = fmadd(ld<V>(p, ps, g, kA0 + j), t, q);
      }
    }
  }
  hidden_fwd<V, G, 1>(p, ps, st);
  hidden_fwd<V, G, 2>(p, ps, st);
  hidden_fwd<V, G, 3>(p, ps, st);
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < 2; ++e)
      f[g][e] = fmadd(ld<V>(p, ps, g, kW4), st.h[g][e][3][0],
                      fmadd(ld<V>(p, ps, g, kW4 + 1), st.h[g][e][3][1],
                            fmadd(ld<V>(p, ps, g, kW4 + 2), st.h[g][e][3][2],
                                  ld<V>(p, ps, g, kB4))));
}

// p = |sigmoid(g U) - sigmoid(g L)|, g = -1 if L + U > 0 else +1; with GRAD also
// dp/dL, dp/dU (= -g sd sigmoid'(gL), g sd sigmoid'(gU), sd = sign of the
// difference, 0 where it is 0).
template <class V, bool GRAD>
CIFD_VINLINE V bin_mass(V lo, V up, V* dl, V* du) {
  const V zero(0), one(1);
  const auto flip = (lo + up) > zero;
  const V zl = select(flip, -lo, lo), zu = select(flip, -up, up);
  const V el = vexp(-vabs(zl)), eu = vexp(-vabs(zu));
  const V nl = select(zl >= zero, one, el), nu = select(zu >= zero, one, eu);
  const V al = one + el, au = one + eu;
  const V num = fnmadd(nl, au, nu * al);  // n_U (1 + e_L) - n_L (1 + e_U)
  const V rinv = one / (al * au);
  if constexpr (GRAD) {
    const V rl = au * rinv, ru = al * rinv;  // 1/(1 + e_L), 1/(1 + e_U)
    const V sgn = select(num > zero, one, select(num < zero, -one, zero));
    const V sd = select(flip, -sgn, sgn);
    *dl = -(sd * (el * rl * rl));
    *du = sd * (eu * ru * ru);
  }
  return vabs(num) * rinv;
}

// One tanh'd layer's backward (K = 1..3) for every vector and both logits:
// d[g][e][j] = dL/dh in; dq = dh (1 + A (1 - t^2)); dA += dh t; db += dq;
// dW[j][i] += dq h_in[i]; d <- W^T dq.
template <class V, int G, int K>
CIFD_VINLINE void hidden_bwd(const Elt<V>* p, int64_t ps, const Block<V, G>& st,
                             V (&d)[G][2][3], Elt<V>* acc, int64_t as) {
  using L = Hidden<K>;
  const V one(1);
  for (int g = 0; g < G; ++g) {
    V q[2][3];
    for (int j = 0; j < 3; ++j) {
      const V a = ld<V>(p, ps, g, L::A + j);
      for (int e = 0; e < 2; ++e) {
        const V t = st.t[g][e][K][j];
        q[e][j] = d[g][e][j] * fmadd(a, fnmadd(t, t, one), one);
      }
      acc_add<V>(acc, as, g, L::A + j,
                 fmadd(d[g][0][j], st.t[g][0][K][j], d[g][1][j] * st.t[g][1][K][j]));
      acc_add<V>(acc, as, g, L::B + j, q[0][j] + q[1][j]);
      for (int i = 0; i < 3; ++i)
        acc_add<V>(acc, as, g, L::W + 3 * j + i,
                   fmadd(q[0][j], st.h[g][0][K - 1][i], q[1][j] * st.h[g][1][K - 1][i]));
    }
    for (int i = 0; i < 3; ++i) {
      const V w0 = ld<V>(p, ps, g, L::W + i), w1 = ld<V>(p, ps, g, L::W + 3 + i),
              w2 = ld<V>(p, ps, g, L::W + 6 + i);
      for (int e = 0; e < 2; ++e) d[g][e][i] = fmadd(w0, q[e][0], fmadd(w1, q[e][1], w2 * q[e][2]));
    }
  }
}

// Backward through both MLPs of every vector from dL/df = gf[g][e]: parameter
// gradients into acc; dx[g] = dL/dx_lower + dL/dx_upper.
template <class V, int G>
CIFD_VINLINE void mlp_bwd(const V (&gf)[G][2], const Elt<V>* p, int64_t ps,
                          const Block<V, G>& st, Elt<V>* acc, int64_t as, V (&dx)[G]) {
  V d[G][2][3];
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < 3; ++i) {
      const V w = ld<V>(p, ps, g, kW4 + i);
      acc_add<V>(acc, as, g, kW4 + i,
                 fmadd(gf[g][0], st.h[g][0][3][i], gf[g][1] * st.h[g][1][3][i]));
      d[g][0][i] = w * gf[g][0];
      d[g][1][i] = w * gf[g][1];
    }
    acc_add<V>(acc, as, g, kB4, gf[g][0] + gf[g][1]);
  }
  hidden_bwd<V, G, 3>(p, ps, st, d, acc, as);
  hidden_bwd<V, G, 2>(p, ps, st, d, acc, as);
  hidden_bwd<V, G, 1>(p, ps, st, d, acc, as);
  const V one(1);
  for (int g = 0; g < G; ++g) {
    V s(0);
    for (int j = 0; j < 3; ++j) {
      const V a = ld<V>(p, ps, g, kA0 + j);
      const V tl = st.t[g][0][0][j], tu = st.t[g][1][0][j];
      const V ql = d[g][0][j] * fmadd(a, fnmadd(tl, tl, one), one);
      const V qu = d[g][1][j] * fmadd(a, fnmadd(tu, tu, one), one);
      acc_add<V>(acc, as, g, kA0 + j, fmadd(d[g][0][j], tl, d[g][1][j] * tu));
      acc_add<V>(acc, as, g, kB0 + j, ql + qu);
      acc_add<V>(acc, as, g, kW0 + j, fmadd(ql, st.x[g][0], qu * st.x[g][1]));
      s = fmadd(ld<V>(p, ps, g, kW0 + j), ql + qu, s);
    }
    dx[g] = s;
  }
}

// f at the bin edges y_hat -/+ 1/2 of every vector (the state into st).
template <class V, int G>
CIFD_VINLINE void edges_fwd(const V (&yh)[G], const Elt<V>* p, int64_t ps, Block<V, G>& st,
                            V (&f)[G][2]) {
  const V half(0.5);
  for (int g = 0; g < G; ++g) {
    st.x[g][0] = yh[g] - half;
    st.x[g][1] = yh[g] + half;
  }
  mlp_fwd<V, G>(p, ps, st, f);
}

// Forward of G lane vectors: lik[g] = p_b = max(p, bound); nll[g] = -ln p_b where
// kept, else 0.
template <class V, int G>
CIFD_VINLINE void block_forward(const V (&yh)[G], const V (&kept)[G], V bound, const Elt<V>* p,
                                int64_t ps, V (&lik)[G], V (&nll)[G]) {
  Block<V, G> st;
  V f[G][2];
  const V zero(0);
  edges_fwd<V, G>(yh, p, ps, st, f);
  for (int g = 0; g < G; ++g) {
    const V pb = clamp_min(bin_mass<V, false>(f[g][0], f[g][1], nullptr, nullptr), bound);
    lik[g] = pb;
    nll[g] = select(kept[g] != zero, -vlog(pb), zero);
  }
}

// Backward of G lane vectors' density part: dL/dp_b = g_lik - (kept ? g_rate/p_b
// : 0), LowerBound's rule, the bin mass, both MLPs. dy[g] = dL/dy_hat through
// the likelihood; parameter gradients go to acc.
template <class V, int G>
CIFD_VINLINE void block_backward(const V (&yh)[G], const V (&kept)[G], const V (&glik)[G],
                                 V grate, V bound, const Elt<V>* p, int64_t ps, Elt<V>* acc,
                                 int64_t as, V (&dy)[G]) {
  Block<V, G> st;
  V f[G][2], gf[G][2];
  const V zero(0);
  edges_fwd<V, G>(yh, p, ps, st, f);
  for (int g = 0; g < G; ++g) {
    V dl, du;
    const V pm = bin_mass<V, true>(f[g][0], f[g][1], &dl, &du);
    const V pb = clamp_min(pm, bound);
    const V gt = glik[g] - select(kept[g] != zero, grate / pb, zero);
    const V gs = select((pm >= bound) | (gt < zero), gt, zero);
    gf[g][0] = gs * dl;
    gf[g][1] = gs * du;
  }
  mlp_bwd<V, G>(gf, p, ps, st, acc, as, dy);
}

}  // namespace lanes
}  // namespace
}  // namespace cpu
}  // namespace cifd
