// SPDX-License-Identifier: Apache-2.0
// cifd_C::cifd_loss_fwd: checks, then the raw CPU or CUDA kernel
// (csrc/cpu/cifd_loss.cpp, csrc/cuda/cifd_loss.cu).
//
//   cifd_loss_fwd(logits, targets, labels, emb, target_embs, lam, keep, nvalid, group_w,
//                 tau, lam_ce, lam_kl, w_emb, dist, ignore_index)
//                 -> (ce, kl, emb_terms, grad_logits, grad_emb)
//
// logits [B, K] and targets [M, B, K] contiguous, one dtype (float32/float16/
// bfloat16); labels [B] int64, each a class in [0, K) or ignore_index (others: IndexError
// on the CPU before the kernel runs, as F.cross_entropy; a device-side assert in the
// CUDA kernel, reported at the stream's next synchronisation); emb [B, D] and target_embs [M, B, D] contiguous, one
// dtype, or both empty (no embedding term); lam [M] float32; keep [M] uint8;
// nvalid 0-dim float32 (#non-ignored labels clamped to >= 1); group_w empty;
// dist 0 mse, 1 smooth_l1. All on one device: the CPU, or one CUDA device (there
// at most cifd::cuda::kCifdLossMaxTargets targets). Returns ce [B], kl [M, B],
// emb_terms [M, B] float32 per-sample terms (tau^2 KL; 0 for dropped targets;
// emb_terms 0 without embeddings or with D = 0) and the gradients of the
// batch-mean loss
//   lam_ce sum(ce)/nvalid + lam_kl sum_m lam_m mean_b kl + w_emb sum_m lam_m mean_b emb
// w.r.t. logits [B, K] and emb [B, D] (empty without embeddings), in their dtypes.
//
// Groups (kernels.h; the stage-1 losses of an RDM bank): logits [G, B, K] and emb
// [G, B, D], G student sets against the same targets and labels; group_w [G]
// float32 (or empty: ones) weights each group's embedding term on top of w_emb.
// Then ce is [G, B], kl and emb_terms [M, G, B], the gradients [G, B, *], and each
// group's loss is the formula above over its own rows, with w_emb group_w[g].
//
//   cifd_loss_reduce(ce, kl, emb_terms, lam, nvalid, group_w, lam_ce, lam_kl, w_emb)
//                 -> (loss, ce_mean, kl_mean, emb_mean)
//
// The batch means of those per-sample terms and the loss (ATen ops, any device):
// loss and ce_mean 0-dim, kl_mean and emb_mean [M]; with groups loss and ce_mean
// [G], kl_mean and emb_mean [M, G].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cifd/kernels.h"
#include "cifd/losses.h"

#ifdef CIFD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

cifd::EbDtype loss_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cifd::EbDtype::kFloat32;
    case at::kHalf: return cifd::EbDtype::kFloat16;
    case at::kBFloat16: return cifd::EbDtype::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type(),
                  " (float64 goes to the reference backend)");
  }
}

// Every tensor argument on `device` (logits' device) and contiguous.
void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (logits' device), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct Checked {
  cifd::CifdLossProblem pr;
  bool has_emb;
};

// Shapes, dtypes, devices and scalars, shared by the CPU and CUDA implementations.
Checked check_args(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
                   const at::Tensor& emb, const at::Tensor& target_embs, const at::Tensor& lam,
                   const at::Tensor& keep, const at::Tensor& nvalid, const at::Tensor& group_w,
                   double tau, double lam_ce, double lam_kl, double w_emb, int64_t dist,
                   int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "logits must be [B, K] or [G, B, K], got ",
              logits.sizes());
  const bool grouped = logits.dim() == 3;
  const int64_t G = grouped ? logits.size(0) : 1;
  const int64_t B = logits.size(-2), K = logits.size(-1);
  TORCH_CHECK(targets.dim() == 3 && targets.size(1) == B && targets.size(2) == K,
              "targets must be [M, ", B, ", ", K, "], got ", targets.sizes());
  const int64_t M = targets.size(0);
  TORCH_CHECK(M >= 1, "targets must hold M >= 1 targets (teacher first)");
  TORCH_CHECK(targets.scalar_type() == logits.scalar_type(), "targets must have logits' dtype ",
              logits.scalar_type(), ", got ", targets.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == B,
              "labels must be int64 [", B, "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.dim() == 1 && lam.size(0) == M,
              "lam must be float32 [", M, "], got ", lam.scalar_type(), " ", lam.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kByte && keep.dim() == 1 && keep.size(0) == M,
              "keep must be uint8 [", M, "], got ", keep.scalar_type(), " ", keep.sizes());
  TORCH_CHECK(nvalid.scalar_type() == at::kFloat && nvalid.numel() == 1,
              "nvalid must be one float32, got ", nvalid.scalar_type(), " ", nvalid.sizes());
  TORCH_CHECK(group_w.numel() == 0 || (grouped && group_w.scalar_type() == at::kFloat &&
                                        group_w.dim() == 1 && group_w.size(0) == G),
              "group_w must be empty or float32 [G] with [G, B, K] logits, got ",
              group_w.scalar_type(), " ", group_w.sizes());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "tau must be finite and > 0, got ", tau);
  TORCH_CHECK(dist == 0 || dist == 1, "dist must be 0 (mse) or 1 (smooth_l1), got ", dist);
  const at::Device dev = logits.device();
  for (auto [t, name] : {std::pair{&logits, "logits"}, {&targets, "targets"}, {&labels, "labels"},
                         {&lam, "lam"}, {&keep, "keep"}, {&nvalid, "nvalid"}})
    check_on(*t, name, dev);
  if (group_w.numel() > 0) check_on(group_w, "group_w", dev);
  const bool has_emb = emb.dim() >= 2;  // "no embeddings" travels as a 1-D empty tensor
  int64_t D = 0;
  if (has_emb) {
    TORCH_CHECK(emb.dim() == logits.dim() && emb.size(-2) == B && (!grouped || emb.size(0) == G),
                "emb must be [", grouped ? "G, " : "", B, ", D] like logits, got ", emb.sizes());
    D = emb.size(-1);
    TORCH_CHECK(target_embs.dim() == 3 && target_embs.size(0) == M && target_embs.size(1) == B &&
                    target_embs.size(2) == D,
                "target_embs must be [", M, ", ", B, ", ", D, "], got ", target_embs.sizes());
    TORCH_CHECK(target_embs.scalar_type() == emb.scalar_type(), "target_embs must have emb's dtype ",
                emb.scalar_type(), ", got ", target_embs.scalar_type());
    check_on(emb, "emb", dev);
    check_on(target_embs, "target_embs", dev);
  }
  cifd::CifdLossProblem pr;
  pr.B = B;
  pr.G = G;
  pr.K = K;
  pr.D = D;
  pr.M = M;
  pr.logits_dtype = loss_dtype(logits, "logits");
  pr.emb_dtype = has_emb ? loss_dtype(emb, "emb") : cifd::EbDtype::kFloat32;
  pr.tau = static_cast<float>(tau);
  pr.lam_ce = static_cast<float>(lam_ce);
  pr.c_kl = B > 0 ? static_cast<float>(lam_kl * tau / static_cast<double>(B)) : 0.0f;
  pr.c_emb = B > 0 ? static_cast<float>(w_emb / static_cast<double>(B)) : 0.0f;
  pr.dist = static_cast<int>(dist);
  pr.ignore_index = ignore_index;
  return {pr, has_emb};
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ce [*], kl [M, *], emb_terms [M, *] with * = [B] or [G, B] (emb_terms zeros when
// there is no embedding term to write: no embeddings, or D = 0), grad_logits,
// grad_emb (empty without embeddings).
Outputs alloc_outputs(const Checked& c, const at::Tensor& logits, const at::Tensor& emb) {
  const auto f32 = logits.options().dtype(at::kFloat);
  const auto rows = logits.sizes().slice(0, logits.dim() - 1);
  std::vector<int64_t> per_target{c.pr.M};
  per_target.insert(per_target.end(), rows.begin(), rows.end());
  return {at::empty(rows, f32), at::empty(per_target, f32),
          c.pr.D > 0 ? at::empty(per_target, f32) : at::zeros(per_target, f32),
          at::empty_like(logits), c.has_emb ? at::empty_like(emb) : at::empty({0}, logits.options())};
}

const float* group_w_ptr(const at::Tensor& group_w) {
  return group_w.numel() > 0 ? group_w.data_ptr<float>() : nullptr;
}

// Checks, outputs, then `launch(pr, <the kernels' pointer arguments>)`: the CPU and
// CUDA kernels share that argument list and differ only in what follows it.
template <class Launch>
Outputs run_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
                const at::Tensor& emb, const at::Tensor& target_embs, const at::Tensor& lam,
                const at::Tensor& keep, const at::Tensor& nvalid, const at::Tensor& group_w,
                double tau, double lam_ce, double lam_kl, double w_emb, int64_t dist,
                int64_t ignore_index, Launch launch) {
  const Checked c = check_args(logits, targets, labels, emb, target_embs, lam, keep, nvalid,
                               group_w, tau, lam_ce, lam_kl, w_emb, dist, ignore_index);
  auto [ce, kl, emb_terms, grad_logits, grad_emb] = alloc_outputs(c, logits, emb);
  const bool e = c.pr.D > 0;
  launch(c.pr, logits.data_ptr(), targets.data_ptr(), labels.data_ptr<int64_t>(),
         e ? emb.data_ptr() : nullptr, e ? target_embs.data_ptr() : nullptr, lam.data_ptr<float>(),
         keep.data_ptr<uint8_t>(), nvalid.data_ptr<float>(), group_w_ptr(group_w),
         ce.data_ptr<float>(), kl.data_ptr<float>(), emb_terms.data_ptr<float>(),
         grad_logits.data_ptr(), e ? grad_emb.data_ptr() : nullptr);
  return {ce, kl, emb_terms, grad_logits, grad_emb};
}

// Every label a class or ignore_index, F.cross_entropy's IndexError otherwise. On the
// CPU an O(B) scan of host memory, before the kernel reads a label; on CUDA the kernel
// asserts instead (reading the labels here would be a host sync).
void check_labels_cpu(const int64_t* labels, const cifd::CifdLossProblem& pr) {
  for (int64_t b = 0; b < pr.B; ++b)
    TORCH_CHECK_INDEX(cifd::losses::label_ok(labels[b], pr.K, pr.ignore_index), "labels[", b,
                      "] = ", labels[b], " is out of bounds for K = ", pr.K,
                      " classes (expected 0 <= label < ", pr.K, ", or ignore_index = ",
                      pr.ignore_index, ")");
}

Outputs fwd_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
                const at::Tensor& emb, const at::Tensor& target_embs, const at::Tensor& lam,
                const at::Tensor& keep, const at::Tensor& nvalid, const at::Tensor& group_w,
                double tau, double lam_ce, double lam_kl, double w_emb, int64_t dist,
                int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor, got ", logits.device());
  return run_fwd(logits, targets, labels, emb, target_embs, lam, keep, nvalid, group_w, tau, lam_ce,
                 lam_kl, w_emb, dist, ignore_index,
                 [](const cifd::CifdLossProblem& pr, const void* z, const void* t,
                    const int64_t* y, const auto&... rest) {
                   check_labels_cpu(y, pr);
                   cifd::cpu::cifd_loss_fwd(pr, z, t, y, rest..., at::get_num_threads());
                 });
}

#ifdef CIFD_WITH_CUDA
Outputs fwd_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
                 const at::Tensor& emb, const at::Tensor& target_embs, const at::Tensor& lam,
                 const at::Tensor& keep, const at::Tensor& nvalid, const at::Tensor& group_w,
                 double tau, double lam_ce, double lam_kl, double w_emb, int64_t dist,
                 int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cuda(), "logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(targets.dim() < 1 || targets.size(0) <= cifd::cuda::kCifdLossMaxTargets,
              "targets: the CUDA kernel takes M <= ", cifd::cuda::kCifdLossMaxTargets,
              " targets, got ", targets.dim() < 1 ? 0 : targets.size(0));
  const c10::cuda::CUDAGuard guard(logits.device());
  return run_fwd(logits, targets, labels, emb, target_embs, lam, keep, nvalid, group_w, tau, lam_ce,
                 lam_kl, w_emb, dist, ignore_index, [](const auto&... a) {
                   const int err =
                       cifd::cuda::cifd_loss_fwd(a..., c10::cuda::getCurrentCUDAStream().stream());
                   C10_CUDA_CHECK(static_cast<cudaError_t>(err));
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}
#endif

using Reduced = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_reduce_args(const at::Tensor& ce_b, const at::Tensor& kl_mb, const at::Tensor& emb_mb,
                       const at::Tensor& lam, const at::Tensor& group_w) {
  TORCH_CHECK(kl_mb.dim() >= 1, "cifd_loss_reduce: kl must be [M, *], got ", kl_mb.sizes());
  const int64_t M = kl_mb.size(0);
  TORCH_CHECK((ce_b.dim() == 1 || ce_b.dim() == 2) && kl_mb.dim() == ce_b.dim() + 1 &&
                  emb_mb.sizes() == kl_mb.sizes() && kl_mb.sizes().slice(1) == ce_b.sizes() &&
                  lam.dim() == 1 && lam.size(0) == M,
              "cifd_loss_reduce: ce [*], kl and emb_terms [M, *], lam [M] expected (* = [B] or "
              "[G, B]), got ", ce_b.sizes(), ", ", kl_mb.sizes(), ", ", emb_mb.sizes(), ", ",
              lam.sizes());
  const bool grouped = ce_b.dim() == 2;
  TORCH_CHECK(group_w.numel() == 0 || (grouped && group_w.dim() == 1 &&
                                        group_w.size(0) == ce_b.size(0)),
              "cifd_loss_reduce: group_w must be empty or [G], got ", group_w.sizes());
}

// The batch-mean terms from the kernels' per-sample ones, in ATen (any device):
// one call instead of ~15 small torch ops from Python.
Reduced reduce(const at::Tensor& ce_b, const at::Tensor& kl_mb, const at::Tensor& emb_mb,
               const at::Tensor& lam, const at::Tensor& nvalid, const at::Tensor& group_w,
               double lam_ce, double lam_kl, double w_emb) {
  check_reduce_args(ce_b, kl_mb, emb_mb, lam, group_w);
  const bool grouped = ce_b.dim() == 2;
  const double B = static_cast<double>(ce_b.size(-1));
  // lam_m against [M] or [M, G] means
  const at::Tensor lam_b = grouped ? lam.unsqueeze(1) : lam;
  at::Tensor ce = ce_b.sum(-1) / nvalid;
  at::Tensor kl = kl_mb.sum(-1) / B;
  at::Tensor emb = emb_mb.sum(-1) / B;
  at::Tensor emb_loss = (lam_b * emb).sum(0) * w_emb;
  if (group_w.numel() > 0) emb_loss = emb_loss * group_w;
  at::Tensor loss = ce * lam_ce + (lam_b * kl).sum(0) * lam_kl + emb_loss;
  return {loss, ce, kl, emb};
}

// The same on the CPU as plain loops (float32 inputs, sums in double): the ATen
// version's ~10 small ops cost ~70 us of dispatch per call, more than the stage-2
// loss kernel itself at a student's sizes. Other dtypes or layouts take reduce().
Reduced reduce_cpu(const at::Tensor& ce_b, const at::Tensor& kl_mb, const at::Tensor& emb_mb,
                   const at::Tensor& lam, const at::Tensor& nvalid, const at::Tensor& group_w,
                   double lam_ce, double lam_kl, double w_emb) {
  check_reduce_args(ce_b, kl_mb, emb_mb, lam, group_w);
  const auto f32_contig = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous();
  };
  if (!(f32_contig(ce_b) && f32_contig(kl_mb) && f32_contig(emb_mb) && f32_contig(lam) &&
        f32_contig(nvalid) && nvalid.numel() == 1 && (group_w.numel() == 0 || f32_contig(group_w))))
    return reduce(ce_b, kl_mb, emb_mb, lam, nvalid, group_w, lam_ce, lam_kl, w_emb);
  const bool grouped = ce_b.dim() == 2;
  const int64_t G = grouped ? ce_b.size(0) : 1, B = ce_b.size(-1), M = kl_mb.size(0);
  const auto opts = ce_b.options();
  at::Tensor loss = grouped ? at::empty({G}, opts) : at::empty({}, opts);
  at::Tensor ce = grouped ? at::empty({G}, opts) : at::empty({}, opts);
  at::Tensor kl = grouped ? at::empty({M, G}, opts) : at::empty({M}, opts);
  at::Tensor emb = grouped ? at::empty({M, G}, opts) : at::empty({M}, opts);
  const float* pce = ce_b.data_ptr<float>();
  const float* pkl = kl_mb.data_ptr<float>();
  const float* pem = emb_mb.data_ptr<float>();
  const float* plam = lam.data_ptr<float>();
  const float* pgw = group_w.numel() > 0 ? group_w.data_ptr<float>() : nullptr;
  const double nv = static_cast<double>(nvalid.data_ptr<float>()[0]);
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t b = 0; b < B; ++b) s += pce[g * B + b];
    const double ce_g = s / nv;
    double kl_sum = 0.0, emb_sum = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      double sk = 0.0, se = 0.0;
      const int64_t row = (m * G + g) * B;
      for (int64_t b = 0; b < B; ++b) {
        sk += pkl[row + b];
        se += pem[row + b];
      }
      const float kl_mg = static_cast<float>(sk / static_cast<double>(B));
      const float emb_mg = static_cast<float>(se / static_cast<double>(B));
      kl.data_ptr<float>()[m * G + g] = kl_mg;
      emb.data_ptr<float>()[m * G + g] = emb_mg;
      kl_sum += static_cast<double>(plam[m]) * kl_mg;
      emb_sum += static_cast<double>(plam[m]) * emb_mg;
    }
    const double w = w_emb * (pgw != nullptr ? static_cast<double>(pgw[g]) : 1.0);
    ce.data_ptr<float>()[g] = static_cast<float>(ce_g);
    loss.data_ptr<float>()[g] = static_cast<float>(lam_ce * ce_g + lam_kl * kl_sum + w * emb_sum);
  }
  return {loss, ce, kl, emb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def(
      "cifd_loss_reduce(Tensor ce, Tensor kl, Tensor emb_terms, Tensor lam, Tensor nvalid, "
      "Tensor group_w, float lam_ce, float lam_kl, float w_emb) -> (Tensor loss, Tensor ce_mean, "
      "Tensor kl_mean, Tensor emb_mean)");
  m.def(
      "cifd_loss_fwd(Tensor logits, Tensor targets, Tensor labels, Tensor emb, Tensor target_embs, "
      "Tensor lam, Tensor keep, Tensor nvalid, Tensor group_w, float tau, float lam_ce, "
      "float lam_kl, float w_emb, int dist, int ignore_index) -> (Tensor ce, Tensor kl, "
      "Tensor emb_terms, Tensor grad_logits, Tensor grad_emb)");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) {
  m.impl("cifd_loss_fwd", &fwd_cpu);
  m.impl("cifd_loss_reduce", &reduce_cpu);
}

TORCH_LIBRARY_IMPL(cifd_C, CompositeExplicitAutograd, m) { m.impl("cifd_loss_reduce", &reduce); }

#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) { m.impl("cifd_loss_fwd", &fwd_cuda); }
#endif
