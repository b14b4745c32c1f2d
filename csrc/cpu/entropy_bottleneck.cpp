// SPDX-License-Identifier: Apache-2.0
// Fused entropy bottleneck on the CPU: OpenMP over fixed work units; per unit,
// spans of up to 64 elements go through two passes:
//   A. y_hat and keep (Philox, noise, rounding), every step rounded on its own,
//      so y_hat matches the reference bit for bit;
//   B. the density (MLP at both bin edges, bin mass, bound, log; or all of their
//      backward, recomputing the forward), at y_hat, or at y_hat / s in noise
//      mode with s != 1 (a small pass between A and B; backward divides the
//      density's gradient by s there and adds grad_y_hat itself).
//
// Three sets of span loops:
// * AVX2 + FMA (entropy_bottleneck_avx2.cpp): hand-vectorised, 8 lanes, Philox
//   8 counters at a time; picked at run time when the CPU has AVX2 and FMA
//   and EbProblem::cpu_avx2 is set (clear it to force the baseline);
// * baseline float32: cifd/density.h's element functions in `#pragma omp simd`
//   loops, for any other CPU (compiled for the build's ISA, no -march);
// * float64: entropy_bottleneck_lanes.h over one double lane with libm's exp,
//   log and tanh, so that float64 gradcheck sees exact math. The noise is the
//   reference's: u in float32 from Philox, then s*u and y + s*u in float64.
//
// Vector lanes: for S == 1 ([N, C]) a span is a tile of 64 channels of one
// row, reading packed parameter rows as vectors (gathered into a [58, 64] tile)
// and accumulating parameter gradients into a [59, 64] tile; for S > 1 it is up
// to 64 positions of one (n, c), reading a broadcast copy of the channel's
// parameters, with [59, 64] per-lane accumulators.
//
// Reductions: accumulators cover at most kFlushRows rows (or blocks), then are
// added into float64 partials, one per work unit; units are a fixed function
// of (N, C, S), never of the thread count, and the partials are summed in unit
// order, so results are bit-identical for any num_threads (given the same ISA
// path: the AVX2 and baseline loops round differently).
//
// -fno-trapping-math for this file: g++ otherwise refuses to if-convert (and so
// to vectorise) a select whose arm holds a float op that might raise an FP
// exception flag. Values are unchanged: it only stops the compiler from
// preserving exception flags, which nothing here reads.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cifd/density.h"
#include "cifd/kernels.h"
#include "entropy_bottleneck_avx2.h"
#include "entropy_bottleneck_lanes.h"

namespace cifd {
namespace cpu {

namespace {

using namespace density;

constexpr int64_t kTile = 64;        // lanes per span: channels (S == 1) or positions (S > 1)
constexpr int64_t kFlushRows = 64;   // accumulation length before the float64 flush
constexpr int64_t kTargetUnits = 64; // backward work units to aim for (fixed: thread-independent)
constexpr int64_t kMinUnitElems = 16384;

#if defined(__GNUC__)
#define CIFD_CPU_INLINE inline __attribute__((always_inline))
#else
#define CIFD_CPU_INLINE inline
#endif

// ------------------------------------------------------------------ baseline float32 loops
// cifd/density.h's element functions; lane l reads p[r * ps + l], adds to
// acc[r * as + l]. Counters are formed in 32-bit lanes (c0 + l, c1 + carry):
// g++ does not vectorise 64-bit ones.
template <int MODE>
void yhat_span_base(const EbProblem& pr, float s, uint64_t ctr0, int64_t count,
                    const float* __restrict__ y, const float* __restrict__ med,
                    float* __restrict__ yh, float* __restrict__ keep) {
  const uint32_t k0 = static_cast<uint32_t>(pr.seed), k1 = static_cast<uint32_t>(pr.seed >> 32);
  const uint32_t c0 = static_cast<uint32_t>(ctr0), c1 = static_cast<uint32_t>(ctr0 >> 32);
  const float rho = pr.rho;
#pragma omp simd
  for (int64_t l = 0; l < count; ++l) {
    const uint32_t lo = c0 + static_cast<uint32_t>(l);
    const YHat q = y_hat(MODE, y[l], MODE == kDequantize ? med[l] : 0.0f, k0, k1, lo,
                         c1 + (lo < c0 ? 1u : 0u), rho, s);
    yh[l] = q.value;
    keep[l] = q.keep != 0u ? 1.0f : 0.0f;
  }
}

double fwd_span_base(int64_t count, float bound, const float* __restrict__ yh,
                     const float* __restrict__ keep, float* __restrict__ lik,
                     const float* __restrict__ p, int64_t ps) {
  double nll = 0.0;
#pragma omp simd reduction(+ : nll)
  for (int64_t l = 0; l < count; ++l) {
    const float pb = likelihood(yh[l], p + l, ps, bound);
    lik[l] = pb;
    nll += keep[l] != 0.0f ? -log_f(pb) : 0.0f;
  }
  return nll;
}

template <int MODE>
void bwd_span_base_mode(int64_t count, float bound, float grate_n, const float* __restrict__ yh,
                        const float* __restrict__ keep, const float* __restrict__ gyh,
                        const float* __restrict__ glik, float* __restrict__ gy,
                        const float* __restrict__ p, int64_t ps, float* __restrict__ acc,
                        int64_t as) {
#pragma omp simd
  for (int64_t l = 0; l < count; ++l) {
    const bool kept = keep[l] != 0.0f;
    const float gt =
        likelihood_backward(yh[l], glik[l], grate_n, kept, bound, p + l, ps, acc + l, as) + gyh[l];
    gy[l] = grad_y_rule(MODE, kept, gt, acc + kMedianRow * as + l);
  }
}

// ------------------------------------------------------------------ AVX2 adapters
void yhat_span_avx2(const EbProblem& pr, float /*s: pr.s*/, uint64_t ctr0, int64_t count,
                    const float* y, const float* med, float* yh, float* keep) {
  eb_avx2::yhat_span(pr, ctr0, count, y, med, yh, keep);
}

// ------------------------------------------------------------------ float64 loops
void yhat_span_f64(const EbProblem& pr, double s, uint64_t ctr0, int64_t count, const double* y,
                   const double* med, double* yh, double* keep) {
  for (int64_t l = 0; l < count; ++l) {
    double v = y[l], k = 1.0;
    if (pr.mode == kNoise) {
      const Philox4 w = philox(pr.seed, ctr0 + static_cast<uint64_t>(l));
      const double u = static_cast<double>(uniform_noise(w.w[0]));  // float32, as the reference
      const bool kept = uint_to_uniform(w.w[1]) >= pr.rho;           // compared in float32
      v = kept ? y[l] + s * u : 0.0;
      k = kept ? 1.0 : 0.0;
    } else if (pr.mode == kDequantize) {
      v = std::nearbyint(y[l] - med[l]) + med[l];  // round half to even (default mode)
    }
    yh[l] = v;
    keep[l] = k;
  }
}

double fwd_span_f64(int64_t count, double bound, const double* yh, const double* keep,
                    double* lik, const double* p, int64_t ps) {
  double nll = 0.0;
  for (int64_t l = 0; l < count; ++l) {
    const vec::D1 y[1] = {yh[l]}, k[1] = {keep[l]};
    vec::D1 lk[1], e[1];
    lanes::block_forward<vec::D1, 1>(y, k, bound, p + l, ps, lk, e);
    lik[l] = lk[0].v;
    nll += e[0].v;
  }
  return nll;
}

void bwd_span_f64(int mode, int64_t count, double bound, double grate_n, const double* yh,
                  const double* keep, const double* gyh, const double* glik, double* gy,
                  const double* p, int64_t ps, double* acc, int64_t as) {
  for (int64_t l = 0; l < count; ++l) {
    const vec::D1 y[1] = {yh[l]}, k[1] = {keep[l]}, gl[1] = {glik[l]};
    vec::D1 dy[1];
    lanes::block_backward<vec::D1, 1>(y, k, gl, grate_n, bound, p + l, ps, acc + l, as, dy);
    const double gt = dy[0].v + gyh[l];
    if (mode == kNoise) {
      gy[l] = keep[l] != 0.0 ? gt : 0.0;
    } else if (mode == kDequantize) {
      acc[kMedianRow * as + l] += gt;
      gy[l] = 0.0;
    } else {
      gy[l] = gt;
    }
  }
}

// ------------------------------------------------------------------ span tables
template <class T>
struct Spans {
  void (*yhat)(const EbProblem&, T, uint64_t, int64_t, const T*, const T*, T*, T*);
  double (*fwd)(int64_t, T, const T*, const T*, T*, const T*, int64_t);
  void (*bwd)(int, int64_t, T, T, const T*, const T*, const T*, const T*, T*, const T*, int64_t,
              T*, int64_t);
};

void bwd_span_base(int mode, int64_t count, float bound, float grate_n, const float* yh,
                   const float* keep, const float* gyh, const float* glik, float* gy,
                   const float* p, int64_t ps, float* acc, int64_t as) {
  switch (mode) {
    case kNoise:
      bwd_span_base_mode<kNoise>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);
      break;
    case kDequantize:
      bwd_span_base_mode<kDequantize>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc,
                                      as);
      break;
    default:
      bwd_span_base_mode<kNone>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);
      break;
  }
}

Spans<float> spans_f32(const EbProblem& pr) {
  const int mode = pr.mode;
  if (pr.cpu_avx2 && eb_avx2::available())
    return Spans<float>{&yhat_span_avx2, &eb_avx2::fwd_span, &eb_avx2::bwd_span};
  switch (mode) {
    case kNoise: return Spans<float>{&yhat_span_base<kNoise>, &fwd_span_base, &bwd_span_base};
    case kDequantize:
      return Spans<float>{&yhat_span_base<kDequantize>, &fwd_span_base, &bwd_span_base};
    default: return Spans<float>{&yhat_span_base<kNone>, &fwd_span_base, &bwd_span_base};
  }
}

Spans<double> spans_f64() { return Spans<double>{&yhat_span_f64, &fwd_span_f64, &bwd_span_f64}; }

// ------------------------------------------------------------------ drivers
// T: compute type of the spans (float or double); element storage per D.
struct F64 {
  using T = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};

template <class T>
struct Ctx {
  EbProblem pr;
  T s, bound;  // noise scale and likelihood bound in T
  const void* y;
  const T* packed;
  int64_t ldp;  // packed's row stride: C, or G C for one group's columns of G
  const T* med;
  void* yhat;
  T* rate;
  T* lik;
  const void* gyh;
  const T* grate;
  const T* glik;
  void* gy;
  double* part;  // [row_splits][59][C] float64 partials (backward)
  int64_t row_splits;
  Spans<T> sp;
};

// Elements in and out of a span: data already in T are used in place; float16
// and bfloat16 go through small float32 buffers.
template <class D, class T>
struct Io {
  using S = typename D::T;
  static constexpr bool kDirect = std::is_same<S, T>::value;
  alignas(64) T in[kTile];
  alignas(64) T in2[kTile];
  alignas(64) T out[kTile];

  const T* load(const void* src, int64_t off, int64_t n) {
    const S* s = static_cast<const S*>(src) + off;
    if constexpr (kDirect) {
      (void)n;
      return reinterpret_cast<const T*>(s);
    } else {
      for (int64_t l = 0; l < n; ++l) in[l] = D::load(s[l]);
      return in;
    }
  }
  const T* load2(const void* src, int64_t off, int64_t n) {
    const S* s = static_cast<const S*>(src) + off;
    if constexpr (kDirect) {
      (void)n;
      return reinterpret_cast<const T*>(s);
    } else {
      for (int64_t l = 0; l < n; ++l) in2[l] = D::load(s[l]);
      return in2;
    }
  }
  T* dst(void* d, int64_t off) {
    if constexpr (kDirect) return static_cast<T*>(d) + off;
    return out;
  }
  void commit(void* d, int64_t off, int64_t n) {
    if constexpr (!kDirect) {
      S* t = static_cast<S*>(d) + off;
      for (int64_t l = 0; l < n; ++l) t[l] = D::store(out[l]);
    }
  }
};

template <class T>
struct Zeros {
  alignas(64) static constexpr T v[kTile] = {};
};

// Channels [c0, c0 + w)'s parameters (and medians) into a contiguous [58, kTile]
// tile. Read in place, the packed rows sit C floats apart: for C a multiple of
// 512 they all map to the same few L1 sets, and the hot loops thrash.
template <class T>
void gather_params(const Ctx<T>& cx, int64_t c0, int64_t w, T* pt, T* mt) {
  for (int r = 0; r < kNumPacked; ++r) {
    const T* src = cx.packed + r * cx.ldp + c0;
    for (int64_t l = 0; l < w; ++l) pt[r * kTile + l] = src[l];
    for (int64_t l = w; l < kTile; ++l) pt[r * kTile + l] = T(0);
  }
  for (int64_t l = 0; l < kTile; ++l)
    mt[l] = cx.pr.mode == kDequantize && l < w ? cx.med[c0 + l] : T(0);
}

// Broadcast channel c's parameters (and median) into [58, kTile] lanes.
template <class T>
void broadcast_params(const Ctx<T>& cx, int64_t c, T* pt, T* mt) {
  for (int r = 0; r < kNumPacked; ++r) {
    const T v = cx.packed[r * cx.ldp + c];
    for (int64_t l = 0; l < kTile; ++l) pt[r * kTile + l] = v;
  }
  const T m = cx.pr.mode == kDequantize ? cx.med[c] : T(0);
  for (int64_t l = 0; l < kTile; ++l) mt[l] = m;
}

// Noise mode with s != 1 reads the density at y_hat / s (cifd/density.h).
template <class T>
bool scaled_noise(const Ctx<T>& cx) {
  return cx.pr.mode == kNoise && cx.s != T(1);
}

// Rows [r0, r1) (at most kFlushRows): y_hat, likelihoods and rate.
template <class D, class T>
void fwd_rows(const Ctx<T>& cx, int64_t r0, int64_t r1) {
  const EbProblem& pr = cx.pr;
  const int64_t C = pr.C, S = pr.S;
  Io<D, T> io;
  alignas(64) T lik_scratch[kTile];
  alignas(64) T pt[kNumPacked * kTile];
  alignas(64) T mt[kTile];
  alignas(64) T keep[kTile];
  alignas(64) T xs[kTile];
  double acc[kFlushRows] = {};
  auto run = [&](int64_t n, int64_t base, int64_t w, const T* p, int64_t ps, const T* m) {
    const T* y = io.load(cx.y, base, w);
    T* yh = io.dst(cx.yhat, base);
    T* lik = cx.lik != nullptr ? cx.lik + base : lik_scratch;
    cx.sp.yhat(pr, cx.s, pr.offset + static_cast<uint64_t>(base), w, y, m, yh, keep);
    const T* x = yh;  // the density's point: y_hat, or y_hat / s (scaled noise)
    if (scaled_noise(cx)) {
      for (int64_t l = 0; l < w; ++l) xs[l] = yh[l] / cx.s;
      x = xs;
    }
    acc[n - r0] += cx.sp.fwd(w, cx.bound, x, keep, lik, p, ps);
    io.commit(cx.yhat, base, w);
  };
  if (S == 1) {
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {  // channel tiles: their parameters stay in L1
      const int64_t w = std::min(kTile, C - c0);
      gather_params(cx, c0, w, pt, mt);
      for (int64_t n = r0; n < r1; ++n) run(n, n * C + c0, w, pt, kTile, mt);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      broadcast_params(cx, c, pt, mt);
      for (int64_t n = r0; n < r1; ++n)
        for (int64_t s0 = 0; s0 < S; s0 += kTile)
          run(n, (n * C + c) * S + s0, std::min(kTile, S - s0), pt, kTile, mt);
    }
  }
  for (int64_t n = r0; n < r1; ++n) cx.rate[n] = static_cast<T>(acc[n - r0]);
}

// Work unit (row split k, column t): t is a channel tile (S == 1) or a channel (S > 1).
template <class D, class T>
void bwd_unit(const Ctx<T>& cx, int64_t k, int64_t t) {
  const EbProblem& pr = cx.pr;
  const int64_t N = pr.N, C = pr.C, S = pr.S;
  const int64_t r0 = N * k / cx.row_splits, r1 = N * (k + 1) / cx.row_splits;
  const bool tiled = S == 1;
  const int64_t c0 = tiled ? t * kTile : t;
  const int64_t w = tiled ? std::min(kTile, C - c0) : 1;  // channels this unit owns
  Io<D, T> io;
  alignas(64) T acc[kNumGrad * kTile];
  alignas(64) T pt[kNumPacked * kTile];
  alignas(64) T mt[kTile];
  if (tiled) {
    gather_params(cx, c0, w, pt, mt);
  } else {
    broadcast_params(cx, c0, pt, mt);
  }
  double* part = cx.part + k * kNumGrad * C + c0;
  int64_t spans = 0;
  std::fill(acc, acc + kNumGrad * kTile, T(0));
  auto flush = [&]() {
    for (int r = 0; r < kNumGrad; ++r) {
      if (tiled) {
        for (int64_t l = 0; l < w; ++l) part[r * C + l] += acc[r * kTile + l];
      } else {
        double s = 0.0;
        for (int64_t l = 0; l < kTile; ++l) s += acc[r * kTile + l];
        part[r * C] += s;
      }
    }
    std::fill(acc, acc + kNumGrad * kTile, T(0));
    spans = 0;
  };
  alignas(64) T yh[kTile];
  alignas(64) T keep[kTile];
  alignas(64) T xs[kTile];
  alignas(64) T gx[kTile];
  auto run = [&](int64_t n, int64_t base, int64_t cnt) {
    const T* y = io.load(cx.y, base, cnt);
    const T* gyh = cx.gyh != nullptr ? io.load2(cx.gyh, base, cnt) : Zeros<T>::v;
    const T* glik = cx.glik != nullptr ? cx.glik + base : Zeros<T>::v;
    T* gy = io.dst(cx.gy, base);
    cx.sp.yhat(pr, cx.s, pr.offset + static_cast<uint64_t>(base), cnt, y, mt, yh, keep);
    const T grate_n = cx.grate != nullptr ? cx.grate[n] : T(0);
    if (scaled_noise(cx)) {
      // The spans' dL/dx at x = y_hat / s (no g_yhat), then keep ? dL/dx / s + g_yhat : 0.
      for (int64_t l = 0; l < cnt; ++l) xs[l] = yh[l] / cx.s;
      cx.sp.bwd(pr.mode, cnt, cx.bound, grate_n, xs, keep, Zeros<T>::v, glik, gx, pt, kTile, acc,
                kTile);
      for (int64_t l = 0; l < cnt; ++l) gy[l] = keep[l] != T(0) ? gx[l] / cx.s + gyh[l] : T(0);
    } else {
      cx.sp.bwd(pr.mode, cnt, cx.bound, grate_n, yh, keep, gyh, glik, gy, pt, kTile, acc, kTile);
    }
    io.commit(cx.gy, base, cnt);
    if (++spans == kFlushRows) flush();
  };
  for (int64_t n = r0; n < r1; ++n) {
    if (tiled) {
      run(n, n * C + c0, w);
    } else {
      for (int64_t s0 = 0; s0 < S; s0 += kTile) run(n, (n * C + c0) * S + s0, std::min(kTile, S - s0));
    }
  }
  flush();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
void run_fwd(Ctx<T>& cx, void (*fn)(const Ctx<T>&, int64_t, int64_t), int num_threads) {
  const EbProblem& pr = cx.pr;
  // Rows in blocks of a fixed size; each row's rate is summed by one thread in a
  // fixed order, so the thread count never changes a bit.
  const int64_t row_elems = pr.C * pr.S;
  const int64_t rows_per =
      std::max<int64_t>(1, std::min<int64_t>(kFlushRows, kMinUnitElems / row_elems));
  const int64_t blocks = ceil_div(pr.N, rows_per);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    fn(cx, b * rows_per, std::min(pr.N, (b + 1) * rows_per));
  }
}

// grad_packed: [59, C] at packed's row stride (cx.ldp).
template <class T, class G>
void run_bwd(Ctx<T>& cx, void (*fn)(const Ctx<T>&, int64_t, int64_t), G* grad_packed,
             int num_threads) {
  const EbProblem& pr = cx.pr;
  const int64_t C = pr.C;
  // Work units: (row split, channel tile) for S == 1, (row split, channel) for
  // S > 1; the number of row splits is a function of the shape alone.
  const int64_t cols = pr.S == 1 ? ceil_div(C, kTile) : C;
  const int64_t numel = pr.N * C * pr.S;
  int64_t splits = ceil_div(kTargetUnits, cols);
  splits = std::min(splits, std::max<int64_t>(1, numel / (kMinUnitElems * cols)));
  splits = std::max<int64_t>(1, std::min(splits, pr.N));
  std::vector<double> part(static_cast<size_t>(splits * kNumGrad * C), 0.0);
  cx.part = part.data();
  cx.row_splits = splits;
  const int64_t units = splits * cols;
#pragma omp parallel num_threads(num_threads) if (units > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) fn(cx, u / cols, u % cols);
    // Fixed-order sum of the partials.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < kNumGrad * C; ++i) {
      double s = 0.0;
      for (int64_t k = 0; k < splits; ++k) s += part[static_cast<size_t>(k * kNumGrad * C + i)];
      grad_packed[(i / C) * cx.ldp + i % C] = static_cast<G>(s);
    }
  }
}

// The entry points below, for the compute type T (float32 kernels over any
// storage dtype, or float64): per group (EbProblem::G), its problem (its block of
// the tensors, its columns of packed and medians, its counters), then empty
// problems, the context and the driver. One group after another, each as one
// call on its block would run: the bits of G calls.
template <class T>
size_t storage_bytes(const EbProblem& pr) {
  if constexpr (std::is_same<T, double>::value) return sizeof(double);
  return pr.dtype == EbDtype::kFloat32 ? 4 : 2;
}

template <class P>
P* block(P* p, int64_t elems, size_t bytes) {
  using Byte = std::conditional_t<std::is_const<P>::value, const char, char>;
  return p == nullptr ? p : reinterpret_cast<P*>(reinterpret_cast<Byte*>(p) + elems * bytes);
}

// Group g's context: its problem (G = 1, its counters), y's block, its columns of
// packed (row stride G C) and medians.
template <class T>
Ctx<T> group_ctx(const EbProblem& pr, int64_t g, T s, T bound, const void* y, const T* packed,
                 const T* medians, Spans<T> sp) {
  const int64_t per = pr.N * pr.C * pr.S;
  Ctx<T> cx{};
  cx.pr = pr;
  cx.pr.G = 1;
  cx.pr.offset = pr.offset + static_cast<uint64_t>(g * per);
  cx.s = s;
  cx.bound = bound;
  cx.y = block(y, g * per, storage_bytes<T>(pr));
  cx.packed = packed + g * pr.C;
  cx.ldp = pr.G * pr.C;
  cx.med = medians != nullptr ? medians + g * pr.C : packed;  // read in dequantize mode only
  cx.sp = sp;
  return cx;
}

template <class T>
void fwd_entry(const EbProblem& pr, T s, T bound, const void* y, const T* packed, const T* medians,
               void* y_hat, T* rate, T* likelihood, Spans<T> sp,
               void (*fn)(const Ctx<T>&, int64_t, int64_t), int num_threads) {
  if (pr.N <= 0) return;
  const int64_t per = pr.N * pr.C * pr.S;
  const size_t b = storage_bytes<T>(pr);
  for (int64_t g = 0; g < pr.G; ++g) {
    T* rate_g = rate + g * pr.N;
    if (pr.C <= 0 || pr.S <= 0) {
      std::fill(rate_g, rate_g + pr.N, T(0));
      continue;
    }
    Ctx<T> cx = group_ctx(pr, g, s, bound, y, packed, medians, sp);
    cx.yhat = block(y_hat, g * per, b);
    cx.rate = rate_g;
    cx.lik = block(likelihood, g * per, sizeof(T));
    run_fwd(cx, fn, num_threads);
  }
}

template <class T>
void bwd_entry(const EbProblem& pr, T s, T bound, const void* y, const T* packed, const T* medians,
               const void* grad_y_hat, const T* grad_rate, const T* grad_likelihood, void* grad_y,
               T* grad_packed, Spans<T> sp, void (*fn)(const Ctx<T>&, int64_t, int64_t),
               int num_threads) {
  const int64_t C = pr.C, ldp = pr.G * C, per = pr.N * C * pr.S;
  if (C <= 0) return;
  const size_t b = storage_bytes<T>(pr);
  for (int64_t g = 0; g < pr.G; ++g) {
    T* gp = grad_packed + g * C;  // [59, C] at row stride G C
    if (pr.N <= 0 || pr.S <= 0) {
      for (int64_t r = 0; r < kNumGrad; ++r) std::fill(gp + r * ldp, gp + r * ldp + C, T(0));
      continue;
    }
    Ctx<T> cx = group_ctx(pr, g, s, bound, y, packed, medians, sp);
    cx.gyh = block(grad_y_hat, g * per, b);
    cx.grate = block(grad_rate, g * pr.N, sizeof(T));
    cx.glik = block(grad_likelihood, g * per, sizeof(T));
    cx.gy = block(grad_y, g * per, b);
    run_bwd(cx, fn, gp, num_threads);
  }
}

}  // namespace

void entropy_bottleneck_fwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, void* y_hat, float* rate, float* likelihood,
                            int num_threads) {
  void (*fn)(const Ctx<float>&, int64_t, int64_t);
  switch (pr.dtype) {
    case EbDtype::kFloat16: fn = &fwd_rows<F16, float>; break;
    case EbDtype::kBFloat16: fn = &fwd_rows<BF16, float>; break;
    default: fn = &fwd_rows<F32, float>; break;
  }
  fwd_entry<float>(pr, pr.s, pr.bound, y, packed, medians, y_hat, rate, likelihood,
                   spans_f32(pr), fn, num_threads);
}

void entropy_bottleneck_bwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, const void* grad_y_hat, const float* grad_rate,
                            const float* grad_likelihood, void* grad_y, float* grad_packed,
                            bool /*deterministic*/, int num_threads) {
  void (*fn)(const Ctx<float>&, int64_t, int64_t);
  switch (pr.dtype) {
    case EbDtype::kFloat16: fn = &bwd_unit<F16, float>; break;
    case EbDtype::kBFloat16: fn = &bwd_unit<BF16, float>; break;
    default: fn = &bwd_unit<F32, float>; break;
  }
  bwd_entry<float>(pr, pr.s, pr.bound, y, packed, medians, grad_y_hat, grad_rate, grad_likelihood,
                   grad_y, grad_packed, spans_f32(pr), fn, num_threads);
}

void entropy_bottleneck_fwd(const EbProblem& pr, double s, double bound, const double* y,
                            const double* packed, const double* medians, double* y_hat,
                            double* rate, double* likelihood, int num_threads) {
  fwd_entry<double>(pr, s, bound, y, packed, medians, y_hat, rate, likelihood, spans_f64(),
                    &fwd_rows<F64, double>, num_threads);
}

void entropy_bottleneck_bwd(const EbProblem& pr, double s, double bound, const double* y,
                            const double* packed, const double* medians, const double* grad_y_hat,
                            const double* grad_rate, const double* grad_likelihood, double* grad_y,
                            double* grad_packed, int num_threads) {
  bwd_entry<double>(pr, s, bound, y, packed, medians, grad_y_hat, grad_rate, grad_likelihood,
                    grad_y, grad_packed, spans_f64(), &bwd_unit<F64, double>, num_threads);
}

}  // namespace cpu
}  // namespace cifd
