// SPDX-License-Identifier: Apache-2.0
// Fused entropy bottleneck on the CPU: OpenMP over fixed work units, the
// per-element math of cifd/density.h in `#pragma omp simd` loops.
//
// Vector lanes: for S == 1 ([N, C]) a loop runs over a tile of 64 channels of
// one row, reading packed parameter rows as vectors (packed is [58, C], channel
// fastest) and accumulating parameter gradients into a [59, 64] float32 tile;
// for S > 1 it runs over up to 64 positions of one (n, c), reading a broadcast
// copy of the channel's parameters, with [59, 64] per-lane accumulators.
//
// Reductions: float32 accumulators cover at most kFlushRows rows (or blocks),
// then are added into float64 partials, one per work unit; units are a fixed
// function of (N, C, S), never of the thread count, and the partials are summed
// in unit order, so results are bit-identical for any num_threads. float64 over
// Kahan: the same cost here (the flush is off the hot loop) and simpler.
//
// The hot loops are compiled twice, for baseline x86-64 and for AVX2 + FMA,
// and picked at run time (setup.py builds for the baseline ISA). FMAs only in
// the density passes: y_hat is computed in a pass without contraction so that it
// matches the reference's separately rounded steps bit for bit.
//
// -fno-trapping-math for this file: g++ otherwise refuses to if-convert (and so
// to vectorise) a select whose arm holds a float op that might raise an FP
// exception flag. Values are unchanged: it only stops the compiler from
// preserving exception flags, which nothing here reads.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cifd/density.h"
#include "cifd/kernels.h"

namespace cifd {
namespace cpu {

namespace {

using namespace density;

constexpr int64_t kTile = 64;        // lanes per span: channels (S == 1) or positions (S > 1)
constexpr int64_t kFlushRows = 64;   // float32 accumulation length before the float64 flush
constexpr int64_t kTargetUnits = 64; // backward work units to aim for (fixed: thread-independent)
constexpr int64_t kMinUnitElems = 16384;

#if defined(__GNUC__)
#define CIFD_CPU_INLINE inline __attribute__((always_inline))
#define CIFD_NOINLINE __attribute__((noinline))
#else
#define CIFD_CPU_INLINE inline
#define CIFD_NOINLINE
#endif

// ------------------------------------------------------------------ the hot loops
// A span is up to kTile elements of one row n whose Philox counters are
// ctr0 + l. Two passes per span:
//   A. y_hat and keep (Philox, noise, rounding) without FMA contraction, so
//      y_hat matches the reference's separately rounded steps bit for bit;
//   B. the density (MLP, bin mass, bound, log; or their backward), where the
//      AVX2 build may fuse a*b + c into FMAs (about 25% fewer instructions).
// Lane l reads its parameter row r at p[r * ps + l] (a [58, kTile] copy of the
// tile's channels for S == 1, a broadcast one for S > 1) and adds its gradient
// for row r to acc[r * as + l]. Data come in and go out as float32 (the
// dtype-specific drivers convert), so each loop is compiled once per mode and
// ISA. Counters are formed in 32-bit lanes (c0 + l, c1 + carry): g++ does not
// vectorise 64-bit ones.

template <int MODE>
CIFD_CPU_INLINE void yhat_span(const EbProblem& pr, uint64_t ctr0, int64_t count,
                               const float* __restrict__ y, const float* __restrict__ med,
                               float* __restrict__ yh, float* __restrict__ keep) {
  const uint32_t k0 = static_cast<uint32_t>(pr.seed), k1 = static_cast<uint32_t>(pr.seed >> 32);
  const uint32_t c0 = static_cast<uint32_t>(ctr0), c1 = static_cast<uint32_t>(ctr0 >> 32);
  const float rho = pr.rho, s = pr.s;
#pragma omp simd
  for (int64_t l = 0; l < count; ++l) {
    const uint32_t lo = c0 + static_cast<uint32_t>(l);
    const YHat q = y_hat(MODE, y[l], MODE == kDequantize ? med[l] : 0.0f, k0, k1, lo,
                         c1 + (lo < c0 ? 1u : 0u), rho, s);
    yh[l] = q.value;
    keep[l] = q.keep != 0u ? 1.0f : 0.0f;
  }
}

// Writes p_b; returns sum over kept lanes of -ln p_b.
CIFD_CPU_INLINE double fwd_density_span(int64_t count, float bound, const float* __restrict__ yh,
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

// gyh, glik: upstream gradients (a zero buffer when absent); gy: float32 grad_y.
template <int MODE>
CIFD_CPU_INLINE void bwd_density_span(int64_t count, float bound, float grate_n,
                                      const float* __restrict__ yh,
                                      const float* __restrict__ keep,
                                      const float* __restrict__ gyh,
                                      const float* __restrict__ glik, float* __restrict__ gy,
                                      const float* __restrict__ p, int64_t ps,
                                      float* __restrict__ acc, int64_t as) {
#pragma omp simd
  for (int64_t l = 0; l < count; ++l) {
    const bool kept = keep[l] != 0.0f;
    const float gt =
        likelihood_backward(yh[l], glik[l], grate_n, kept, bound, p + l, ps, acc + l, as) + gyh[l];
    gy[l] = grad_y_rule(MODE, kept, gt, acc + kMedianRow * as + l);
  }
}

using YhatSpanFn = void (*)(const EbProblem&, uint64_t, int64_t, const float*, const float*,
                            float*, float*);
using FwdSpanFn = double (*)(int64_t, float, const float*, const float*, float*, const float*,
                             int64_t);
using BwdSpanFn = void (*)(int64_t, float, float, const float*, const float*, const float*,
                           const float*, float*, const float*, int64_t, float*, int64_t);

// The hot loops for the baseline ISA and for AVX2 (+FMA); the always_inline
// bodies take the ISA and options of the function they are inlined into.
#define CIFD_EB_VARIANTS(SUFFIX, ISA, FUSE)                                                     \
  template <int MODE>                                                                         \
  ISA CIFD_NOINLINE void yhat_span_##SUFFIX(const EbProblem& pr, uint64_t ctr0, int64_t count, \
                                            const float* y, const float* med, float* yh,      \
                                            float* keep) {                                    \
    yhat_span<MODE>(pr, ctr0, count, y, med, yh, keep);                                        \
  }                                                                                           \
  ISA FUSE CIFD_NOINLINE double fwd_span_##SUFFIX(int64_t count, float bound, const float* yh, \
                                                  const float* keep, float* lik,              \
                                                  const float* p, int64_t ps) {               \
    return fwd_density_span(count, bound, yh, keep, lik, p, ps);                              \
  }                                                                                           \
  template <int MODE>                                                                         \
  ISA FUSE CIFD_NOINLINE void bwd_span_##SUFFIX(                                              \
      int64_t count, float bound, float grate_n, const float* yh, const float* keep,          \
      const float* gyh, const float* glik, float* gy, const float* p, int64_t ps, float* acc, \
      int64_t as) {                                                                           \
    bwd_density_span<MODE>(count, bound, grate_n, yh, keep, gyh, glik, gy, p, ps, acc, as);   \
  }

#if defined(__GNUC__) && !defined(__clang__)
#define CIFD_FUSE __attribute__((optimize("no-trapping-math", "fp-contract=fast")))
#else
#define CIFD_FUSE
#endif
CIFD_EB_VARIANTS(base, , )
#if defined(__x86_64__) && defined(__GNUC__)
#define CIFD_EB_AVX2 1
CIFD_EB_VARIANTS(avx2, __attribute__((target("avx2,fma"))), CIFD_FUSE)
#endif
#undef CIFD_EB_VARIANTS

bool use_avx2() {
#ifdef CIFD_EB_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

struct Spans {
  YhatSpanFn yhat;
  FwdSpanFn fwd;
  BwdSpanFn bwd;
};

template <int MODE>
Spans pick_spans() {
#ifdef CIFD_EB_AVX2
  if (use_avx2()) return Spans{&yhat_span_avx2<MODE>, &fwd_span_avx2, &bwd_span_avx2<MODE>};
#endif
  return Spans{&yhat_span_base<MODE>, &fwd_span_base, &bwd_span_base<MODE>};
}

Spans spans_for(int mode) {
  switch (mode) {
    case kNoise: return pick_spans<kNoise>();
    case kDequantize: return pick_spans<kDequantize>();
    default: return pick_spans<kNone>();
  }
}

// ------------------------------------------------------------------ drivers
struct Ctx {
  EbProblem pr;
  const void* y;
  const float* packed;
  const float* med;
  void* yhat;
  float* rate;
  float* lik;
  const void* gyh;
  const float* grate;
  const float* glik;
  void* gy;
  double* part;  // [row_splits][59][C] float64 partials (backward)
  int64_t row_splits;
  Spans sp;
};

// Elements in and out of a span: float32 data are used in place; float16 and
// bfloat16 go through small float32 buffers.
template <class D>
struct Io {
  using T = typename D::T;
  static constexpr bool kDirect = std::is_same<T, float>::value;
  alignas(64) float in[kTile];
  alignas(64) float in2[kTile];
  alignas(64) float out[kTile];

  const float* load(const void* src, int64_t off, int64_t n) {
    const T* s = static_cast<const T*>(src) + off;
    if constexpr (kDirect) {
      (void)n;
      return reinterpret_cast<const float*>(s);
    } else {
      for (int64_t l = 0; l < n; ++l) in[l] = D::load(s[l]);
      return in;
    }
  }
  const float* load2(const void* src, int64_t off, int64_t n) {
    const T* s = static_cast<const T*>(src) + off;
    if constexpr (kDirect) {
      (void)n;
      return reinterpret_cast<const float*>(s);
    } else {
      for (int64_t l = 0; l < n; ++l) in2[l] = D::load(s[l]);
      return in2;
    }
  }
  float* dst(void* d, int64_t off) {
    if constexpr (kDirect) return static_cast<float*>(d) + off;
    return out;
  }
  void commit(void* d, int64_t off, int64_t n) {
    if constexpr (!kDirect) {
      T* t = static_cast<T*>(d) + off;
      for (int64_t l = 0; l < n; ++l) t[l] = D::store(out[l]);
    }
  }
};

alignas(64) const float kZeros[kTile] = {};

// Channels [c0, c0 + w)'s parameters (and medians) into a contiguous [58, kTile]
// tile. Read in place, the packed rows sit C floats apart: for C a multiple of
// 512 they all map to the same few L1 sets, and the hot loops thrash.
void gather_params(const Ctx& cx, int64_t c0, int64_t w, float* pt, float* mt) {
  for (int r = 0; r < kNumPacked; ++r) {
    const float* src = cx.packed + r * cx.pr.C + c0;
    for (int64_t l = 0; l < w; ++l) pt[r * kTile + l] = src[l];
    for (int64_t l = w; l < kTile; ++l) pt[r * kTile + l] = 0.0f;
  }
  for (int64_t l = 0; l < kTile; ++l)
    mt[l] = cx.pr.mode == kDequantize && l < w ? cx.med[c0 + l] : 0.0f;
}

// Broadcast channel c's parameters (and median) into [58, kTile] lanes.
void broadcast_params(const Ctx& cx, int64_t c, float* pt, float* mt) {
  for (int r = 0; r < kNumPacked; ++r) {
    const float v = cx.packed[r * cx.pr.C + c];
    for (int64_t l = 0; l < kTile; ++l) pt[r * kTile + l] = v;
  }
  const float m = cx.pr.mode == kDequantize ? cx.med[c] : 0.0f;
  for (int64_t l = 0; l < kTile; ++l) mt[l] = m;
}

// Rows [r0, r1) (at most kFlushRows): y_hat, likelihoods and rate.
template <class D>
void fwd_rows(const Ctx& cx, int64_t r0, int64_t r1) {
  const EbProblem& pr = cx.pr;
  const int64_t C = pr.C, S = pr.S;
  Io<D> io;
  alignas(64) float lik_scratch[kTile];
  alignas(64) float pt[kNumPacked * kTile];
  alignas(64) float mt[kTile];
  alignas(64) float keep[kTile];
  double acc[kFlushRows] = {};
  auto run = [&](int64_t n, int64_t base, int64_t w, const float* p, int64_t ps, const float* m) {
    const float* y = io.load(cx.y, base, w);
    float* yh = io.dst(cx.yhat, base);
    float* lik = cx.lik != nullptr ? cx.lik + base : lik_scratch;
    cx.sp.yhat(pr, pr.offset + static_cast<uint64_t>(base), w, y, m, yh, keep);
    acc[n - r0] += cx.sp.fwd(w, pr.bound, yh, keep, lik, p, ps);
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
  for (int64_t n = r0; n < r1; ++n) cx.rate[n] = static_cast<float>(acc[n - r0]);
}

// Work unit (row split k, column t): t is a channel tile (S == 1) or a channel (S > 1).
template <class D>
void bwd_unit(const Ctx& cx, int64_t k, int64_t t) {
  const EbProblem& pr = cx.pr;
  const int64_t N = pr.N, C = pr.C, S = pr.S;
  const int64_t r0 = N * k / cx.row_splits, r1 = N * (k + 1) / cx.row_splits;
  const bool tiled = S == 1;
  const int64_t c0 = tiled ? t * kTile : t;
  const int64_t w = tiled ? std::min(kTile, C - c0) : 1;  // channels this unit owns
  Io<D> io;
  alignas(64) float acc[kNumGrad * kTile];
  alignas(64) float pt[kNumPacked * kTile];
  alignas(64) float mt[kTile];
  if (tiled) {
    gather_params(cx, c0, w, pt, mt);
  } else {
    broadcast_params(cx, c0, pt, mt);
  }
  const float* p = pt;
  const int64_t ps = kTile;
  const float* m = mt;
  double* part = cx.part + k * kNumGrad * C + c0;
  int64_t spans = 0;
  std::memset(acc, 0, sizeof(acc));
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
    std::memset(acc, 0, sizeof(acc));
    spans = 0;
  };
  alignas(64) float yh[kTile];
  alignas(64) float keep[kTile];
  auto run = [&](int64_t n, int64_t base, int64_t cnt) {
    const float* y = io.load(cx.y, base, cnt);
    const float* gyh = cx.gyh != nullptr ? io.load2(cx.gyh, base, cnt) : kZeros;
    const float* glik = cx.glik != nullptr ? cx.glik + base : kZeros;
    float* gy = io.dst(cx.gy, base);
    cx.sp.yhat(pr, pr.offset + static_cast<uint64_t>(base), cnt, y, m, yh, keep);
    cx.sp.bwd(cnt, pr.bound, cx.grate != nullptr ? cx.grate[n] : 0.0f, yh, keep, gyh, glik, gy, p,
              ps, acc, kTile);
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

}  // namespace

void entropy_bottleneck_fwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, void* y_hat, float* rate, float* likelihood,
                            int num_threads) {
  if (pr.N <= 0) return;
  if (pr.C <= 0 || pr.S <= 0) {
    std::fill(rate, rate + pr.N, 0.0f);
    return;
  }
  Ctx cx{};
  cx.pr = pr;
  cx.y = y;
  cx.packed = packed;
  cx.med = medians != nullptr ? medians : packed;  // read in dequantize mode only
  cx.yhat = y_hat;
  cx.rate = rate;
  cx.lik = likelihood;
  cx.sp = spans_for(pr.mode);
  void (*fn)(const Ctx&, int64_t, int64_t);
  switch (pr.dtype) {
    case EbDtype::kFloat16: fn = &fwd_rows<F16>; break;
    case EbDtype::kBFloat16: fn = &fwd_rows<BF16>; break;
    default: fn = &fwd_rows<F32>; break;
  }
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

void entropy_bottleneck_bwd(const EbProblem& pr, const void* y, const float* packed,
                            const float* medians, const void* grad_y_hat, const float* grad_rate,
                            const float* grad_likelihood, void* grad_y, float* grad_packed,
                            bool /*deterministic*/, int num_threads) {
  const int64_t C = pr.C;
  if (C <= 0) return;
  if (pr.N <= 0 || pr.S <= 0) {
    std::fill(grad_packed, grad_packed + kNumGrad * C, 0.0f);
    return;
  }
  // Work units: (row split, channel tile) for S == 1, (row split, channel) for
  // S > 1; the number of row splits is a function of the shape alone.
  const int64_t cols = pr.S == 1 ? ceil_div(C, kTile) : C;
  const int64_t numel = pr.N * C * pr.S;
  int64_t splits = ceil_div(kTargetUnits, cols);
  splits = std::min(splits, std::max<int64_t>(1, numel / (kMinUnitElems * cols)));
  splits = std::max<int64_t>(1, std::min(splits, pr.N));
  std::vector<double> part(static_cast<size_t>(splits * kNumGrad * C), 0.0);

  Ctx cx{};
  cx.pr = pr;
  cx.y = y;
  cx.packed = packed;
  cx.med = medians != nullptr ? medians : packed;
  cx.gyh = grad_y_hat;
  cx.grate = grad_rate;
  cx.glik = grad_likelihood;
  cx.gy = grad_y;
  cx.part = part.data();
  cx.row_splits = splits;
  cx.sp = spans_for(pr.mode);
  void (*fn)(const Ctx&, int64_t, int64_t);
  switch (pr.dtype) {
    case EbDtype::kFloat16: fn = &bwd_unit<F16>; break;
    case EbDtype::kBFloat16: fn = &bwd_unit<BF16>; break;
    default: fn = &bwd_unit<F32>; break;
  }
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
      grad_packed[i] = static_cast<float>(s);
    }
  }
}

}  // namespace cpu
}  // namespace cifd
