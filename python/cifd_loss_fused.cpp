// SPDX-License-Identifier: Apache-2.0
// cifd_C::cifd_loss_fused: the stage-2 CIFD loss (docs/METHOD.md section 4) from the
// student's outputs to (loss, terms), with its autograd in C++.
//
//   cifd_loss_fused(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop,
//                   seed, offset, lam_ce, lam_kl, w_emb, lam_I, dist, ignore_index,
//                   group_w=None, seed_tensor=None) -> (loss, ce, kl, emb_terms, keep, rate)
//
// The loss op of the C++ backends (cpu, cuda), eagerly and under torch.compile alike.
// After cifd_kernels.ops.cifd_loss's argument checks, one call runs: the KD-dropout keep flags (cifd_C::philox_keep_mask_out,
// word 1 of counters offset .. offset + M - 1; all kept when p_drop = 0), the count of
// non-ignored labels, the fused kernel (cifd_C::cifd_loss_fwd, which also writes the
// gradients), the batch means (cifd_C::cifd_loss_reduce), and the IBM rate term
// loss += lam_I * mean(ibm_rate). The backward node scales the saved gradients by the
// loss's gradient and hands the rate its share. Its autograd is C++ because, at the
// stage-2 step's size (B = 128, K = 10, D = 128, M = 4), a Python autograd.Function
// around the same kernel cost more host time than the kernel (benchmarks/NOTES.md).
// seed_tensor: a 0-dim int64 CPU tensor standing for seed (a seed drawn in a traced
// graph), read by the keep-flag op when it runs.
//
// logits [B, K] float32/float16/bfloat16; targets [M, B, K]; labels [B] integer, each a
// class in [0, K) or ignore_index (cifd_C::cifd_loss_fwd refuses others: IndexError on
// the CPU before its kernel runs, a device-side assert on CUDA); emb
// [B, D] and target_embs [M, B, D], or both None; lam [M] float32; ibm_rate [B] or
// None; dist 0 mse, 1 smooth_l1. Outputs: loss 0-dim float32 (differentiable to
// logits, emb and ibm_rate); ce 0-dim, kl and emb_terms [M], float32, not
// differentiable; keep [M] bool; rate 0-dim float32, mean(ibm_rate) (differentiable),
// zero without ibm_rate. Registered for CPU (no autograd: inference mode) and
// AutogradCPU (and CUDA, AutogradCUDA in CUDA builds); the kernels are reached
// through the dispatcher below autograd.
//
// With group_w [G] (the RDM bank's stage-1 losses, cifd_kernels.ops.cifd_loss.grouped_loss):
// logits [G, B, K] and emb [G, B, D], group g's embedding term weighted by group_w[g];
// loss and ce are [G], kl and emb_terms [M, G], and each group's rows of the gradients
// scale by its loss's gradient.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
    double, double, int64_t, int64_t);
using ReduceSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, double, double);
using KeepSig = void(at::Tensor&, int64_t, int64_t, double, const std::optional<at::Tensor>&);

// The ops this one is made of, looked up once.
struct Ops {
  c10::TypedOperatorHandle<FwdSig> fwd;
  c10::TypedOperatorHandle<ReduceSig> reduce;
  c10::TypedOperatorHandle<KeepSig> keep;
};

const Ops& ops() {
  using cifd_bind::find_op;
  static const Ops o{find_op<FwdSig>("cifd_C::cifd_loss_fwd"),
                     find_op<ReduceSig>("cifd_C::cifd_loss_reduce"),
                     find_op<KeepSig>("cifd_C::philox_keep_mask_out")};
  return o;
}

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

struct Outputs {
  at::Tensor loss, ce, kl, emb, keep, rate, grad_logits, grad_emb;
};

Outputs run(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
            const std::optional<at::Tensor>& emb, const std::optional<at::Tensor>& target_embs,
            const at::Tensor& lam, const std::optional<at::Tensor>& ibm_rate, double tau,
            double p_drop, int64_t seed, int64_t offset, double lam_ce, double lam_kl,
            double w_emb, double lam_I, int64_t dist, int64_t ignore_index,
            const std::optional<at::Tensor>& group_w,
            const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK(logits.dim() == 2 || (logits.dim() == 3 && given(group_w)),
              "student_logits must be [B, K] (or [G, B, K] with group_w), got ", logits.sizes());
  TORCH_CHECK(targets.dim() == 3, "target_logits must be [M, B, K], got ", targets.sizes());
  TORCH_CHECK(given(emb) == given(target_embs),
              "student_emb and target_embs go together: pass both or neither");
  const int64_t M = targets.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  Outputs o;
  if (p_drop == 0.0) {
    o.keep = at::ones({M}, logits.options().dtype(at::kBool));
  } else {
    o.keep = at::empty({M}, logits.options().dtype(at::kBool));
    ops().keep.call(o.keep, seed, offset, p_drop, seed_tensor);
  }
  const at::Tensor lab = cifd_bind::as_dtype(labels, at::kLong).contiguous();
  at::Tensor nvalid;  // #labels != ignore_index, at least 1, as a 0-dim float32
  // On the CPU a host loop (cheaper than three ATen ops); on a device, or for a tensor
  // with the Python key (a fake tensor while torch.compile traces: no data to read), the
  // ATen ops. An integer count either way: the same bits.
  if (lab.device().is_cpu() && !lab.key_set().has(c10::DispatchKey::Python)) {
    int64_t n = 0;
    const int64_t* lp = lab.data_ptr<int64_t>();
    for (int64_t i = 0; i < lab.numel(); ++i) n += lp[i] != ignore_index;
    nvalid = at::scalar_tensor(static_cast<double>(n > 0 ? n : 1), f32);
  } else {  // no host read (on a device: no sync), the Python path's ops
    nvalid = (labels != ignore_index).sum().clamp_min(1).to(at::kFloat);
  }
  const at::Tensor none = at::empty({0}, f32);
  const at::Tensor gw =
      given(group_w) ? cifd_bind::as_dtype(*group_w, at::kFloat).contiguous() : none;
  const at::Tensor e = given(emb) ? emb->contiguous() : none;
  const at::Tensor te =
      given(emb) ? cifd_bind::as_dtype(*target_embs, emb->scalar_type()).contiguous() : none;
  auto [ce_b, kl_mb, emb_mb, gz, gu] = ops().fwd.call(
      logits.contiguous(), cifd_bind::as_dtype(targets, logits.scalar_type()).contiguous(), lab,
      e, te, cifd_bind::as_dtype(lam, at::kFloat).contiguous(), o.keep.to(at::kByte), nvalid, gw,
      tau, lam_ce, lam_kl, w_emb, dist, ignore_index);
  auto [loss, ce, kl, emb_terms] =
      ops().reduce.call(ce_b, kl_mb, emb_mb, lam, nvalid, gw, lam_ce, lam_kl, w_emb);
  if (given(ibm_rate)) {
    o.rate = cifd_bind::as_dtype(*ibm_rate, at::kFloat).mean();
    o.loss = loss + o.rate * lam_I;
  } else {
    o.rate = at::zeros({}, f32);
    o.loss = loss;
  }
  o.ce = ce;
  o.kl = kl;
  o.emb = emb_terms;
  o.grad_logits = gz;
  o.grad_emb = gu;
  return o;
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// CPU key: no autograd (inference mode, or below autograd).
Result fused_plain(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& labels,
                   const std::optional<at::Tensor>& emb,
                   const std::optional<at::Tensor>& target_embs, const at::Tensor& lam,
                   const std::optional<at::Tensor>& ibm_rate, double tau, double p_drop,
                   int64_t seed, int64_t offset, double lam_ce, double lam_kl, double w_emb,
                   double lam_I, int64_t dist, int64_t ignore_index,
                   const std::optional<at::Tensor>& group_w,
                   const std::optional<at::Tensor>& seed_tensor) {
  Outputs o = run(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed,
                  offset, lam_ce, lam_kl, w_emb, lam_I, dist, ignore_index, group_w, seed_tensor);
  return {o.loss, o.ce, o.kl, o.emb, o.keep, o.rate};
}

struct Fused : public torch::autograd::Function<Fused> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& labels,
                               const std::optional<at::Tensor>& emb,
                               const std::optional<at::Tensor>& target_embs,
                               const at::Tensor& lam, const std::optional<at::Tensor>& ibm_rate,
                               double tau, double p_drop, int64_t seed, int64_t offset,
                               double lam_ce, double lam_kl, double w_emb, double lam_I,
                               int64_t dist, int64_t ignore_index,
                               const std::optional<at::Tensor>& group_w,
                               const std::optional<at::Tensor>& seed_tensor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Outputs o = run(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau, p_drop, seed,
                    offset, lam_ce, lam_kl, w_emb, lam_I, dist, ignore_index, group_w,
                    seed_tensor);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({o.grad_logits, o.grad_emb});
    ctx->saved_data["lam_I"] = lam_I;
    ctx->saved_data["rate_batch"] = given(ibm_rate) ? ibm_rate->size(0) : int64_t{-1};
    ctx->saved_data["has_emb"] = given(emb);
    // One call: mark_non_differentiable replaces the set it was given before.
    if (given(ibm_rate)) {
      ctx->mark_non_differentiable({o.ce, o.kl, o.emb, o.keep});
    } else {
      ctx->mark_non_differentiable({o.ce, o.kl, o.emb, o.keep, o.rate});
    }
    return {o.loss, o.ce, o.kl, o.emb, o.keep, o.rate};
  }

  // The Python path's formulas: grad_logits = gz * g, grad_emb = gu * g (g in their
  // dtypes); the rate term's nodes: (g lam_I + g_rate) through mean's backward.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& gz = saved[0];
    const at::Tensor& gu = saved[1];
    const at::Tensor& g = grads[0];
    const at::Tensor& g_rate = grads[5];
    variable_list out(19);
    if (g.defined()) {
      // g: 0-dim, or [G] with groups (group g's rows scale by g[g])
      std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
      shape.insert(shape.end(), {1, 1});
      const at::Tensor gs = g.reshape(shape);
      out[0] = gz * cifd_bind::as_dtype(gs, gz.scalar_type());
      if (ctx->saved_data["has_emb"].toBool()) {
        out[3] = gu * cifd_bind::as_dtype(gs, gu.scalar_type());
      }
    }
    const int64_t rate_batch = ctx->saved_data["rate_batch"].toInt();
    if (rate_batch >= 0 && (g.defined() || g_rate.defined())) {
      at::Tensor gr;
      if (g.defined()) gr = g * ctx->saved_data["lam_I"].toDouble();
      if (g_rate.defined()) gr = gr.defined() ? gr + g_rate : g_rate;
      out[6] = gr.expand({rate_batch}) / rate_batch;
    }
    return out;
  }
};

Result fused_autograd(const at::Tensor& logits, const at::Tensor& targets,
                      const at::Tensor& labels, const std::optional<at::Tensor>& emb,
                      const std::optional<at::Tensor>& target_embs, const at::Tensor& lam,
                      const std::optional<at::Tensor>& ibm_rate, double tau, double p_drop,
                      int64_t seed, int64_t offset, double lam_ce, double lam_kl, double w_emb,
                      double lam_I, int64_t dist, int64_t ignore_index,
                      const std::optional<at::Tensor>& group_w,
                      const std::optional<at::Tensor>& seed_tensor) {
  variable_list o = Fused::apply(logits, targets, labels, emb, target_embs, lam, ibm_rate, tau,
                                 p_drop, seed, offset, lam_ce, lam_kl, w_emb, lam_I, dist,
                                 ignore_index, group_w, seed_tensor);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def(
      "cifd_loss_fused(Tensor logits, Tensor targets, Tensor labels, Tensor? emb, "
      "Tensor? target_embs, Tensor lam, Tensor? ibm_rate, float tau, float p_drop, int seed, "
      "int offset, float lam_ce, float lam_kl, float w_emb, float lam_I, int dist, "
      "int ignore_index, Tensor? group_w=None, Tensor? seed_tensor=None) -> (Tensor loss, "
      "Tensor ce, Tensor kl, "
      "Tensor emb_terms, Tensor keep, Tensor rate)");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) { m.impl("cifd_loss_fused", &fused_plain); }

TORCH_LIBRARY_IMPL(cifd_C, AutogradCPU, m) { m.impl("cifd_loss_fused", &fused_autograd); }

// CUDA: the same op over the CUDA loss kernel. tools/gpu_check.sh runs it on a GPU.
#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) { m.impl("cifd_loss_fused", &fused_plain); }

TORCH_LIBRARY_IMPL(cifd_C, AutogradCUDA, m) { m.impl("cifd_loss_fused", &fused_autograd); }
#endif
