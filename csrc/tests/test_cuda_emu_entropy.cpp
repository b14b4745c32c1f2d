// SPDX-License-Identifier: Apache-2.0
// The CUDA entropy-bottleneck launchers and kernels (csrc/cuda/entropy_bottleneck.cu),
// run on the CPU through cuda_emu.h, against the C++ CPU kernels: launch geometry,
// indexing, grid-stride loops, the block reductions, warp shuffles, the partial-rate
// reduction, atomics against deterministic partials, the MINB=2 instance, every
// mode, float32, bfloat16 and float16, [N, C] and spatial inputs, G groups in one
// launch against G launches. The per-element math runs
// as host code here (see cuda_emu.h), so y_hat must match bit for bit and the rest
// to float32 rounding of different summation orders.
#include "cuda_emu.h"  // first: it defines what the .cu file expects of CUDA

#include <algorithm>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cuda/entropy_bottleneck.cu"
#include "check.h"
#include "random_packed.h"
#include "cifd/density.h"
#include "cifd/kernels.h"

using cifd::EbDtype;
using cifd::EbProblem;

namespace {

// 16-bit storage: float16 or bfloat16 bits, through density.h's conversions.
uint16_t to_half(float f, EbDtype dt) {
  return dt == EbDtype::kFloat16 ? cifd::density::F16::store(f) : cifd::density::BF16::store(f);
}
float from_half(uint16_t u, EbDtype dt) {
  return dt == EbDtype::kFloat16 ? cifd::density::F16::load(u) : cifd::density::BF16::load(u);
}

struct Case {
  int64_t N, C, S;
  int mode;
  float rho;
  EbDtype dtype;
  float s = 1.0f;  // noise scale: s != 1 reads the density at y_hat / s
};

// One case: forward and backward through the emulated CUDA launchers and the CPU
// kernels, compared; the backward both ways (atomics, deterministic) and, for
// float32, with the MINB=2 instance too.
void run_case(const Case& k, int num_sms) {
  std::mt19937 g(
      static_cast<unsigned>(k.N * 131 + k.C * 7 + k.S + k.mode * 1000 + static_cast<int>(k.dtype)));
  EbProblem pr;
  pr.N = k.N;
  pr.C = k.C;
  pr.S = k.S;
  pr.mode = k.mode;
  pr.dtype = k.dtype;
  pr.seed = (1ULL << 40) + 7;
  pr.offset = (1ULL << 32) - 50;  // the counter's low word carries
  pr.rho = k.rho;
  pr.s = k.s;
  const int64_t n = k.N * k.C * k.S;
  const bool bf = k.dtype != EbDtype::kFloat32;  // 16-bit storage
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> yf(n), gyf(n), glik(n), grate(k.N), med(k.C);
  for (auto& v : yf) v = nd(g);
  for (auto& v : gyf) v = nd(g) / 3.0f;
  for (auto& v : glik) v = nd(g) / 3.0f;
  for (auto& v : grate) v = 1.0f + nd(g) / 10.0f;
  for (auto& v : med) v = nd(g) / 30.0f;
  std::vector<uint16_t> yb(n), gyb(n);
  for (int64_t i = 0; i < n; ++i) {
    yb[i] = to_half(yf[i], k.dtype);
    gyb[i] = to_half(gyf[i], k.dtype);
  }
  const void* y = bf ? static_cast<const void*>(yb.data()) : yf.data();
  const void* gy_in = bf ? static_cast<const void*>(gyb.data()) : gyf.data();
  const size_t esz = bf ? 2 : 4;
  const std::vector<float> packed = random_packed(k.C, g);

  // forward
  std::vector<unsigned char> yh_cpu(n * esz), yh_emu(n * esz);
  std::vector<float> rate_cpu(k.N), rate_emu(k.N, -1.0f), lik_cpu(n), lik_emu(n);
  cifd::cpu::entropy_bottleneck_fwd(pr, y, packed.data(), med.data(), yh_cpu.data(), rate_cpu.data(),
                                    lik_cpu.data(), 1);
  std::vector<float> work(std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_fwd_workspace(pr, num_sms)));
  CHECK(cifd::cuda::entropy_bottleneck_fwd(pr, y, packed.data(), med.data(), yh_emu.data(), rate_emu.data(),
                                           lik_emu.data(), work.data(), num_sms, nullptr) == 0);
  CHECK_MSG(yh_cpu == yh_emu, "y_hat bits, N=%lld C=%lld S=%lld mode %d", (long long)k.N, (long long)k.C,
            (long long)k.S, k.mode);
  for (int64_t i = 0; i < n; ++i) CHECK_CLOSE(lik_emu[i], lik_cpu[i], 1e-5, 1e-8);
  for (int64_t r = 0; r < k.N; ++r) CHECK_CLOSE(rate_emu[r], rate_cpu[r], 1e-5, 1e-4);

  // backward
  const int64_t ng = cifd::density::kNumGrad * k.C;
  std::vector<unsigned char> gy_cpu(n * esz);
  std::vector<float> gp_cpu(ng);
  cifd::cpu::entropy_bottleneck_bwd(pr, y, packed.data(), med.data(), gy_in, grate.data(), glik.data(),
                                    gy_cpu.data(), gp_cpu.data(), true, 1);
  float gscale = 0.0f;
  for (float v : gp_cpu) gscale = std::max(gscale, std::fabs(v));
  for (int minb : {1, 2}) {
    if (minb == 2 && bf) continue;  // the MINB=2 instance is float32 only
    pr.cuda_bwd_min_blocks = minb;
    for (bool det : {true, false}) {
      std::vector<unsigned char> gy_emu(n * esz);
      std::vector<float> gp_emu(ng, -7.0f);
      std::vector<float> bw(
          std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_bwd_workspace(pr, det, num_sms)));
      CHECK(cifd::cuda::entropy_bottleneck_bwd(pr, y, packed.data(), med.data(), gy_in, grate.data(),
                                               glik.data(), gy_emu.data(), gp_emu.data(), det, bw.data(),
                                               num_sms, nullptr) == 0);
      for (int64_t i = 0; i < n; ++i) {
        float a, b;
        if (bf) {
          uint16_t ua, ub;
          std::memcpy(&ua, &gy_emu[2 * i], 2);
          std::memcpy(&ub, &gy_cpu[2 * i], 2);
          a = from_half(ua, k.dtype);
          b = from_half(ub, k.dtype);
          CHECK_CLOSE(a, b, 1e-2, 1e-3);  // 16-bit outputs: a rounding step apart at most
        } else {
          std::memcpy(&a, &gy_emu[4 * i], 4);
          std::memcpy(&b, &gy_cpu[4 * i], 4);
          CHECK_CLOSE(a, b, 2e-4, 1e-5);  // the CPU kernel contracts into FMAs, this does not
        }
      }
      for (int64_t r = 0; r < ng; ++r) CHECK_CLOSE(gp_emu[r], gp_cpu[r], 1e-4, 1e-5 * gscale);
    }
  }
  pr.cuda_bwd_min_blocks = 1;
}

// G problems in one launch (EbProblem::G, grid z: the RDM bank's channel) against G
// launches on the groups' blocks (columns g C.., offset + g N C S): the same bits.
void run_groups(int64_t G, int64_t N, int64_t C, int64_t S, int mode, float rho, int num_sms) {
  namespace d = cifd::density;
  std::mt19937 g(static_cast<unsigned>(G * 7 + N * 3 + C + S * 11 + mode));
  std::normal_distribution<float> nd(0.0f, 3.0f);
  EbProblem pr;
  pr.N = N;
  pr.C = C;
  pr.S = S;
  pr.G = G;
  pr.mode = mode;
  pr.seed = 99;
  pr.offset = (1ULL << 32) - 77;
  pr.rho = rho;
  const int64_t per = N * C * S, n = G * per;
  std::vector<float> y(n), gyh(n), glik(n), grate(G * N), med(G * C);
  for (auto& v : y) v = nd(g);
  for (auto& v : gyh) v = nd(g) / 3.0f;
  for (auto& v : glik) v = nd(g) / 3.0f;
  for (auto& v : grate) v = 1.0f + nd(g) / 10.0f;
  for (auto& v : med) v = nd(g) / 30.0f;
  const std::vector<float> packed = random_packed(G * C, g);
  std::vector<float> yh(n), rate(G * N), lik(n);
  std::vector<float> fw(std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_fwd_workspace(pr, num_sms)));
  CHECK(cifd::cuda::entropy_bottleneck_fwd(pr, y.data(), packed.data(), med.data(), yh.data(), rate.data(),
                                           lik.data(), fw.data(), num_sms, nullptr) == 0);
  for (bool det : {true, false}) {
    std::vector<float> gy(n), gp(d::kNumGrad * G * C, -3.0f);
    std::vector<float> bw(
        std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_bwd_workspace(pr, det, num_sms)));
    CHECK(cifd::cuda::entropy_bottleneck_bwd(pr, y.data(), packed.data(), med.data(), gyh.data(),
                                             grate.data(), glik.data(), gy.data(), gp.data(), det, bw.data(),
                                             num_sms, nullptr) == 0);
    for (int64_t k = 0; k < G; ++k) {
      EbProblem p1 = pr;
      p1.G = 1;
      p1.offset = pr.offset + static_cast<uint64_t>(k * per);
      std::vector<float> pk(d::kNumPacked * C);
      for (int r = 0; r < d::kNumPacked; ++r)
        for (int64_t c = 0; c < C; ++c) pk[r * C + c] = packed[r * G * C + k * C + c];
      const float* yk = y.data() + k * per;
      std::vector<float> yh1(per), rate1(N), lik1(per), gy1(per), gp1(d::kNumGrad * C);
      std::vector<float> fw1(std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_fwd_workspace(p1, num_sms)));
      std::vector<float> bw1(
          std::max<int64_t>(1, cifd::cuda::entropy_bottleneck_bwd_workspace(p1, det, num_sms)));
      CHECK(cifd::cuda::entropy_bottleneck_fwd(p1, yk, pk.data(), med.data() + k * C, yh1.data(),
                                               rate1.data(), lik1.data(), fw1.data(), num_sms, nullptr) == 0);
      CHECK(cifd::cuda::entropy_bottleneck_bwd(p1, yk, pk.data(), med.data() + k * C, gyh.data() + k * per,
                                               grate.data() + k * N, glik.data() + k * per, gy1.data(),
                                               gp1.data(), det, bw1.data(), num_sms, nullptr) == 0);
      const bool same_fwd = std::equal(yh1.begin(), yh1.end(), yh.begin() + k * per) &&
                            std::equal(rate1.begin(), rate1.end(), rate.begin() + k * N) &&
                            std::equal(lik1.begin(), lik1.end(), lik.begin() + k * per);
      CHECK_MSG(same_fwd, "groups forward, group %lld of G=%lld, S=%lld", (long long)k, (long long)G,
                (long long)S);
      CHECK_MSG(std::equal(gy1.begin(), gy1.end(), gy.begin() + k * per), "groups grad_y, group %lld",
                (long long)k);
      // deterministic: the same bits; atomics: the adds' order follows the schedule
      float scale = 0.0f;
      for (float v : gp1) scale = std::max(scale, std::fabs(v));
      bool same_gp = true;
      for (int r = 0; r < d::kNumGrad; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const float a = gp1[r * C + c], b = gp[r * G * C + k * C + c];
          same_gp = same_gp && (det ? a == b : std::fabs(a - b) <= 1e-5f * scale);
        }
      CHECK_MSG(same_gp, "groups grad_packed, group %lld, deterministic %d", (long long)k, det ? 1 : 0);
    }
  }
}

}  // namespace

int main() {
  const EbDtype f32 = EbDtype::kFloat32, b16 = EbDtype::kBFloat16, f16 = EbDtype::kFloat16;
  const Case cases[] = {
      {37, 300, 1, 0, 0.25f, f32},  // [N, C], three forward column blocks (the rate reduction)
      {37, 300, 1, 1, 0.0f, f32},   // dequantize: the medians' gradient row
      {37, 300, 1, 2, 0.0f, f32},
      {9, 70, 1, 0, 0.0f, b16},     // bfloat16 storage
      {9, 70, 1, 1, 0.0f, f16},     // float16 storage
      {3, 5, 40, 0, 0.25f, f32},    // spatial: the per-channel backward, two column blocks
      {3, 5, 40, 1, 0.0f, f32},
      {2, 3, 100, 2, 0.0f, b16},
      {1, 1, 1, 0, 0.0f, f32},      // a single element
      {37, 300, 1, 0, 0.25f, f32, 0.3f},  // the IBM's scaled channel: density at y_hat / s
      {3, 5, 40, 0, 0.0f, f32, 0.3f},
      {9, 70, 1, 0, 0.25f, b16, 2.5f},
  };
  for (const Case& k : cases) {
    for (int sms : {1, 3}) run_case(k, sms);  // different grids, same results
  }
  run_groups(3, 37, 300, 1, 0, 0.25f, 1);  // [N, C] blocks: three column blocks each
  run_groups(3, 7, 20, 1, 1, 0.0f, 3);     // dequantize: per-group medians
  run_groups(2, 3, 5, 40, 2, 0.0f, 1);     // spatial
  run_groups(1, 5, 9, 1, 0, 0.0f, 1);      // G = 1 through the same code
  if (failures == 0) std::printf("test_cuda_emu_entropy: all passed\n");
  return failures;
}
