// SPDX-License-Identifier: Apache-2.0
// The CUDA stage-2 loss launcher and kernel (csrc/cuda/cifd_loss.cu), run on the CPU
// through cuda_emu.h, against the C++ CPU kernel: one block per row with its
// threads strided over K and D, the online log-sum-exp merged across warps and the
// block, the per-target scalars in dynamic shared memory, targets past the kernel's
// register group (M > 8), dropped targets, ignored labels, groups with their
// weights, both distortions, float32 and bfloat16, out-of-range labels (the device
// assert's condition, counted here instead of stopping the kernel, and the rows it
// would stop kept in bounds) and the launcher's argument errors. The per-element math is the same host code on both sides (see
// cuda_emu.h), so the results agree to float32 rounding of different summation
// orders.
#include "cuda_emu.h"  // first: it defines what the .cu file expects of CUDA

#include <random>
#include <vector>

// The kernel's device-side assert (a GPU stops there) counts its failures instead.
namespace {
int device_assert_failures = 0;
}
#define CIFD_DEVICE_ASSERT(cond, msg) \
  do {                                \
    if (!(cond)) ++device_assert_failures; \
  } while (0)

#include "../cuda/cifd_loss.cu"
#include "check.h"
#include "cifd/density.h"
#include "cifd/kernels.h"

using cifd::CifdLossProblem;
using cifd::EbDtype;

namespace {

struct Case {
  int64_t B, K, D, M, G;
  int dist;
  EbDtype dtype;
  bool drop;  // drop target 1
  bool bad_labels = false;  // rows b % 4 == 1: labels K, -1, 10^6 in turn
};

float load(const std::vector<unsigned char>& buf, int64_t i, bool bf) {
  if (bf) {
    uint16_t u;
    std::memcpy(&u, &buf[2 * i], 2);
    return cifd::density::BF16::load(u);
  }
  float f;
  std::memcpy(&f, &buf[4 * i], 4);
  return f;
}

void run_case(const Case& k) {
  std::mt19937 g(static_cast<unsigned>(k.B * 97 + k.K * 13 + k.D * 5 + k.M + k.G * 1000 + k.dist));
  std::normal_distribution<float> nd(0.0f, 2.0f);
  CifdLossProblem pr;
  pr.B = k.B;
  pr.K = k.K;
  pr.D = k.D;
  pr.M = k.M;
  pr.G = k.G;
  pr.logits_dtype = k.dtype;
  pr.emb_dtype = k.dtype;
  pr.tau = 2.0f;
  pr.lam_ce = 0.7f;
  pr.c_kl = 0.9f * pr.tau / static_cast<float>(k.B);
  pr.c_emb = 1.3f / static_cast<float>(k.B);
  pr.dist = k.dist;
  pr.ignore_index = -100;
  const bool bf = k.dtype == EbDtype::kBFloat16;
  std::vector<float> logits(k.G * k.B * k.K), targets(k.M * k.B * k.K), emb(k.G * k.B * k.D),
      temb(k.M * k.B * k.D), lam(k.M), gw(k.G);
  for (auto& v : logits) v = nd(g);
  for (auto& v : targets) v = nd(g);
  for (auto& v : emb) v = nd(g);
  for (auto& v : temb) v = nd(g);
  for (int64_t m = 0; m < k.M; ++m) lam[m] = 0.5f + 0.1f * static_cast<float>(m);
  for (int64_t j = 0; j < k.G; ++j) gw[j] = 1.0f + static_cast<float>(j);
  std::vector<uint8_t> keep(k.M, 1);
  if (k.drop && k.M > 1) keep[1] = 0;
  std::vector<int64_t> labels(k.B);
  float nvalid = 0.0f;
  const int64_t bad[] = {k.K, -1, 1000000};
  int64_t nbad = 0;
  for (int64_t b = 0; b < k.B; ++b) {
    labels[b] = (b % 4 == 3) ? -100 : static_cast<int64_t>(g() % static_cast<unsigned>(k.K));
    if (k.bad_labels && b % 4 == 1) labels[b] = bad[nbad++ % 3];
    nvalid += labels[b] != -100 ? 1.0f : 0.0f;
  }
  nvalid = std::max(nvalid, 1.0f);
  const size_t esz = bf ? 2 : 4;
  std::vector<unsigned char> lg(logits.size() * esz), tg(targets.size() * esz), em(emb.size() * esz),
      te(temb.size() * esz);
  auto fill = [&](std::vector<unsigned char>& dst, const std::vector<float>& src) {
    if (!bf) {
      std::memcpy(dst.data(), src.data(), dst.size());
      return;
    }
    for (size_t i = 0; i < src.size(); ++i) {
      const uint16_t h = cifd::density::BF16::store(src[i]);
      std::memcpy(&dst[2 * i], &h, 2);
    }
  };
  fill(lg, logits);
  fill(tg, targets);
  fill(em, emb);
  fill(te, temb);
  const void* embp = k.D > 0 ? em.data() : nullptr;
  const void* tembp = k.D > 0 ? te.data() : nullptr;
  const float* gwp = k.G > 1 ? gw.data() : nullptr;

  struct Out {
    std::vector<float> ce, kl, et;
    std::vector<unsigned char> gl, ge;
  };
  auto make = [&] {
    Out o;
    o.ce.assign(k.G * k.B, -1.0f);
    o.kl.assign(k.M * k.G * k.B, -1.0f);
    o.et.assign(k.M * k.G * k.B, -1.0f);
    o.gl.assign(k.G * k.B * k.K * esz, 0xee);
    o.ge.assign(std::max<int64_t>(1, k.G * k.B * k.D) * esz, 0xee);
    return o;
  };
  Out cpu = make(), emu = make();
  cifd::cpu::cifd_loss_fwd(pr, lg.data(), tg.data(), labels.data(), embp, tembp, lam.data(), keep.data(),
                           &nvalid, gwp, cpu.ce.data(), cpu.kl.data(), cpu.et.data(), cpu.gl.data(),
                           k.D > 0 ? cpu.ge.data() : nullptr, 1);
  device_assert_failures = 0;
  const int rc = cifd::cuda::cifd_loss_fwd(pr, lg.data(), tg.data(), labels.data(), embp, tembp, lam.data(),
                                           keep.data(), &nvalid, gwp, emu.ce.data(), emu.kl.data(),
                                           emu.et.data(), emu.gl.data(), k.D > 0 ? emu.ge.data() : nullptr,
                                           nullptr);
  CHECK(rc == 0);
  // once per student row r = g B + b with a bad label (thread 0 of its block)
  CHECK_MSG(device_assert_failures == nbad * k.G, "%d device assert failures, want %lld",
            device_assert_failures, static_cast<long long>(nbad * k.G));
  for (size_t i = 0; i < cpu.ce.size(); ++i) CHECK_CLOSE(emu.ce[i], cpu.ce[i], 1e-5, 1e-5);
  for (size_t i = 0; i < cpu.kl.size(); ++i) CHECK_CLOSE(emu.kl[i], cpu.kl[i], 1e-5, 1e-5);
  for (size_t i = 0; i < cpu.et.size(); ++i) CHECK_CLOSE(emu.et[i], cpu.et[i], 1e-5, 1e-4);
  const double rg = bf ? 1e-2 : 1e-5, ag = bf ? 1e-4 : 1e-7;
  for (int64_t i = 0; i < k.G * k.B * k.K; ++i) CHECK_CLOSE(load(emu.gl, i, bf), load(cpu.gl, i, bf), rg, ag);
  for (int64_t i = 0; i < k.G * k.B * k.D; ++i) CHECK_CLOSE(load(emu.ge, i, bf), load(cpu.ge, i, bf), rg, ag);
}

}  // namespace

int main() {
  const EbDtype f32 = EbDtype::kFloat32, b16 = EbDtype::kBFloat16;
  const Case cases[] = {
      {5, 10, 7, 4, 1, 0, f32, false},     // the recipe's shape, small
      {3, 1000, 0, 2, 1, 0, f32, true},    // K = 1000: 128 threads, no embeddings, a dropped target
      {4, 33, 100, 10, 1, 1, f32, true},   // M > kGroup: the extra sweeps; smooth_l1
      {2, 50, 10, 9, 1, 0, f32, false},    // M = kGroup + 1: one target in the extra sweep
      {6, 7, 20, 3, 3, 0, f32, false},     // groups with weights (the bank's stage-1 losses)
      {4, 300, 40, 4, 2, 1, b16, true},    // bfloat16
      {1, 1, 1, 1, 1, 0, f32, false},      // one of everything
      // bad labels: flagged once per row, and (where a GPU stops) the kernel still reads
      // nothing out of bounds and computes what the CPU kernel does for them
      {12, 10, 7, 4, 1, 0, f32, false, true},  // labels K, -1, 10^6
      {6, 7, 20, 3, 3, 0, f32, false, true},   // with groups: each group's rows
      {9, 1000, 0, 2, 1, 0, f32, true, true},  // 128 threads a row, only thread 0 asserts
  };
  for (const Case& k : cases) run_case(k);
  // argument errors: M outside [1, kCifdLossMaxTargets]
  CifdLossProblem bad;
  bad.B = 1;
  bad.K = 1;
  bad.M = 0;
  CHECK(cifd::cuda::cifd_loss_fwd(bad, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  nullptr) == cudaErrorInvalidValue);
  if (failures == 0) std::printf("test_cuda_emu_loss: all passed\n");
  return failures;
}
