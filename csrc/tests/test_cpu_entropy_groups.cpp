// SPDX-License-Identifier: Apache-2.0
// The C++ CPU entropy kernels with G groups in one call (EbProblem::G: the RDM bank's
// channel) against G calls on the groups' blocks (columns g C.. of packed and medians,
// counters offset + g N C S): the same bits, forward and backward, every mode, [N, C]
// and spatial, float32 storage on both float32 loop sets (AVX2 + FMA where the CPU has
// them, and the baseline), bfloat16 storage, and the float64 entry points.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cifd/density.h"
#include "cifd/kernels.h"
#include "random_packed.h"

using cifd::EbDtype;
using cifd::EbProblem;
namespace d = cifd::density;

namespace {

// Column block k ([rows, C]) of a [rows, G C] matrix.
template <class T>
std::vector<T> columns(const std::vector<T>& m, int rows, int64_t G, int64_t C, int64_t k) {
  std::vector<T> out(static_cast<size_t>(rows * C));
  for (int r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = m[r * G * C + k * C + c];
  return out;
}

// Storage element of float v: T itself, or bfloat16 bits.
template <class S>
S stored(float v) {
  if constexpr (sizeof(S) == 2) {
    return d::BF16::store(v);
  } else {
    return static_cast<S>(v);
  }
}

// S: y's storage type (float, uint16_t for bfloat16, double); T: the compute type.
template <class S, class T>
void run_groups(int64_t G, int64_t N, int64_t C, int64_t Sp, int mode, float rho, bool avx2) {
  std::mt19937 g(static_cast<unsigned>(G * 7 + N * 3 + C + Sp * 11 + mode + sizeof(S)));
  std::normal_distribution<float> nd(0.0f, 3.0f);
  EbProblem pr;
  pr.N = N;
  pr.C = C;
  pr.S = Sp;
  pr.G = G;
  pr.mode = mode;
  pr.dtype = sizeof(S) == 2 ? EbDtype::kBFloat16 : EbDtype::kFloat32;
  pr.seed = 1234567;
  pr.offset = (1ULL << 33) - 5;
  pr.rho = rho;
  pr.s = mode == 0 ? 0.5f : 1.0f;
  pr.cpu_avx2 = avx2;
  const double s = pr.s, bound = 1e-9;
  const int64_t per = N * C * Sp, n = G * per;
  std::vector<S> y(n), gyh(n);
  std::vector<T> glik(n), grate(G * N), med(G * C), packed;
  for (auto& v : y) v = stored<S>(nd(g));
  for (auto& v : gyh) v = stored<S>(nd(g) / 3.0f);
  for (auto& v : glik) v = static_cast<T>(nd(g) / 3.0f);
  for (auto& v : grate) v = static_cast<T>(1.0f + nd(g) / 10.0f);
  for (auto& v : med) v = static_cast<T>(nd(g) / 30.0f);
  for (float v : random_packed(G * C, g)) packed.push_back(static_cast<T>(v));

  auto fwd = [&](const EbProblem& p, const S* yy, const T* pk, const T* m, S* yh, T* rate, T* lik) {
    if constexpr (std::is_same<T, double>::value) {
      cifd::cpu::entropy_bottleneck_fwd(p, s, bound, yy, pk, m, yh, rate, lik, 2);
    } else {
      cifd::cpu::entropy_bottleneck_fwd(p, yy, pk, m, yh, rate, lik, 2);
    }
  };
  auto bwd = [&](const EbProblem& p, const S* yy, const T* pk, const T* m, const S* gy_hat,
                 const T* gr, const T* gl, S* gy, T* gp) {
    if constexpr (std::is_same<T, double>::value) {
      cifd::cpu::entropy_bottleneck_bwd(p, s, bound, yy, pk, m, gy_hat, gr, gl, gy, gp, 2);
    } else {
      cifd::cpu::entropy_bottleneck_bwd(p, yy, pk, m, gy_hat, gr, gl, gy, gp, true, 2);
    }
  };
  std::vector<S> yh(n), gy(n);
  std::vector<T> rate(G * N), lik(n), gp(d::kNumGrad * G * C, T(-3));
  fwd(pr, y.data(), packed.data(), med.data(), yh.data(), rate.data(), lik.data());
  bwd(pr, y.data(), packed.data(), med.data(), gyh.data(), grate.data(), glik.data(), gy.data(),
      gp.data());
  for (int64_t k = 0; k < G; ++k) {
    EbProblem p1 = pr;
    p1.G = 1;
    p1.offset = pr.offset + static_cast<uint64_t>(k * per);
    const std::vector<T> pk = columns(packed, d::kNumPacked, G, C, k);
    std::vector<S> yh1(per), gy1(per);
    std::vector<T> rate1(N), lik1(per), gp1(d::kNumGrad * C);
    fwd(p1, y.data() + k * per, pk.data(), med.data() + k * C, yh1.data(), rate1.data(), lik1.data());
    bwd(p1, y.data() + k * per, pk.data(), med.data() + k * C, gyh.data() + k * per,
        grate.data() + k * N, glik.data() + k * per, gy1.data(), gp1.data());
    const bool same_fwd = std::equal(yh1.begin(), yh1.end(), yh.begin() + k * per) &&
                          std::equal(rate1.begin(), rate1.end(), rate.begin() + k * N) &&
                          std::equal(lik1.begin(), lik1.end(), lik.begin() + k * per);
    CHECK_MSG(same_fwd, "forward, group %lld of G=%lld, S=%lld, mode %d, storage %d bytes, avx2 %d",
              (long long)k, (long long)G, (long long)Sp, mode, (int)sizeof(S), avx2 ? 1 : 0);
    CHECK_MSG(std::equal(gy1.begin(), gy1.end(), gy.begin() + k * per), "grad_y, group %lld, mode %d",
              (long long)k, mode);
    CHECK_MSG(columns(gp, d::kNumGrad, G, C, k) == gp1, "grad_packed, group %lld, mode %d", (long long)k,
              mode);
  }
}

}  // namespace

int main() {
  for (bool avx2 : {true, false}) {
    run_groups<float, float>(3, 37, 300, 1, 0, 0.25f, avx2);  // [N, C]: several channel tiles
    run_groups<float, float>(3, 7, 20, 1, 1, 0.0f, avx2);     // dequantize: per-group medians
    run_groups<float, float>(2, 3, 5, 40, 0, 0.0f, avx2);     // spatial, scaled noise
    run_groups<float, float>(2, 3, 5, 40, 2, 0.0f, avx2);
    run_groups<uint16_t, float>(3, 9, 70, 1, 0, 0.25f, avx2);  // bfloat16 storage
  }
  run_groups<double, double>(3, 6, 5, 1, 0, 0.25f, true);  // the float64 entry points
  run_groups<double, double>(2, 4, 3, 2, 1, 0.0f, true);
  run_groups<float, float>(1, 5, 9, 1, 0, 0.0f, true);      // G = 1 through the same code
  if (failures == 0) std::printf("test_cpu_entropy_groups: all passed\n");
  return failures;
}
