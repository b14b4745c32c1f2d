// SPDX-License-Identifier: Apache-2.0
// cifd_C::entropy_bottleneck_fused: the entropy bottleneck from the CompressAI-layout
// density parameters to (y_hat, rate, likelihood), with its autograd in C++.
//
//   entropy_bottleneck_fused(y, params, medians, mode, seed, offset, rho, s, bound,
//                            need_likelihood, deterministic, save_y_hat, groups=0,
//                            seed_tensor=None) -> (y_hat, rate, likelihood)
//
// The entropy op of the C++ backends (cpu, cuda), eagerly and under torch.compile
// alike: density_pack, then entropy_bottleneck_fwd; its backward node runs
// entropy_bottleneck_bwd, then density_unpack_grad, and hands the gradients to y, to
// each of the 14 parameters (H0 b0 a0 ... H4 b4) and to the medians. Its autograd is
// C++ because, measured at the IBM's size ([128, 32]), a Python autograd.Function
// around the same kernels cost more host time than the kernels (benchmarks/NOTES.md).
//
// y: contiguous, float32/float16/bfloat16/float64 (entropy_bottleneck_fwd's rules);
// params: the 14 tensors on y's device (density_pack's); medians: [C] in the compute dtype in
// mode 1 (dequantize), any strides, else None. save_y_hat (the caller's rule,
// ops/entropy_bottleneck.py:_saved_input): backward re-evaluates the density at the
// saved y_hat in mode 2 (none) instead of at y, regenerating nothing. Gradients are
// not materialized: an output without a gradient costs its kernel nothing.
// groups = G >= 1: the RDM bank's channel, y [G, N, C] against params of G C channels
// (entropy_bottleneck_{fwd,bwd} with groups; rate [G, N]); 0: one problem.
// seed_tensor: a 0-dim int64 CPU tensor standing for seed (a seed drawn in a traced
// graph), handed to both kernels' ops, which read it when they run.
//
// Registered for CPU (a plain forward: inference mode, no autograd) and AutogradCPU,
// and in CUDA builds for CUDA and AutogradCUDA (see the end of the file).
// The kernels are reached through the dispatcher below autograd, so this file
// depends on their schemas only; with their fake kernels (cifd_kernels/ops/
// entropy_bottleneck.py) tracing runs through this op's C++ autograd.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kNumPacked = 58;  // row 58 of the packed gradient: the medians'

using PackSig = at::Tensor(at::TensorList, bool);
using UnpackSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList);
using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double,
    double, double, bool, int64_t, const std::optional<at::Tensor>&);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, int64_t,
                                                  int64_t, int64_t, double, double, double, bool,
                                                  int64_t, const std::optional<at::Tensor>&);

// The ops this one is made of, looked up once.
struct Ops {
  c10::TypedOperatorHandle<PackSig> pack;
  c10::TypedOperatorHandle<UnpackSig> unpack;
  c10::TypedOperatorHandle<FwdSig> fwd;
  c10::TypedOperatorHandle<BwdSig> bwd;
};

const Ops& ops() {
  using cifd_bind::find_op;
  static const Ops o{find_op<PackSig>("cifd_C::density_pack"),
                     find_op<UnpackSig>("cifd_C::density_unpack_grad"),
                     find_op<FwdSig>("cifd_C::entropy_bottleneck_fwd"),
                     find_op<BwdSig>("cifd_C::entropy_bottleneck_bwd")};
  return o;
}

// The kernels' medians argument: the tensor (contiguous) in dequantize mode, else an
// empty one.
at::Tensor medians_arg(const std::optional<at::Tensor>& medians, const at::Tensor& packed) {
  return medians.has_value() && medians->defined() ? medians->contiguous()
                                                   : at::empty({0}, packed.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(
    const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians, int64_t mode,
    int64_t seed, int64_t offset, double rho, double s, double bound, bool need_likelihood,
    int64_t groups, const std::optional<at::Tensor>& seed_tensor) {
  return ops().fwd.call(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood,
                        groups, seed_tensor);
}

at::Tensor pack(const at::Tensor& y, at::TensorList params) {
  return ops().pack.call(params, y.scalar_type() == at::kDouble);
}

// CPU key: no autograd (inference mode, or below autograd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_plain(
    const at::Tensor& y, at::TensorList params, const std::optional<at::Tensor>& medians,
    int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound,
    bool need_likelihood, bool /*deterministic*/, bool /*save_y_hat*/, int64_t groups,
    const std::optional<at::Tensor>& seed_tensor) {
  const at::Tensor packed = pack(y, params);
  return run_forward(y, packed, medians_arg(medians, packed), mode, seed, offset, rho, s, bound,
                     need_likelihood, groups, seed_tensor);
}

struct Fused : public torch::autograd::Function<Fused> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, at::TensorList params,
                               const std::optional<at::Tensor>& medians, int64_t mode,
                               int64_t seed, int64_t offset, double rho, double s, double bound,
                               bool need_likelihood, bool deterministic, bool save_y_hat,
                               int64_t groups, const std::optional<at::Tensor>& seed_tensor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor packed = pack(y, params);
    const at::Tensor med = medians_arg(medians, packed);
    auto [y_hat, rate, lik] = run_forward(y, packed, med, mode, seed, offset, rho, s, bound,
                                          need_likelihood, groups, seed_tensor);
    ctx->set_materialize_grads(false);
    // saved: y (or y_hat), packed, medians, the seed tensor (undefined: none), params
    variable_list saved{save_y_hat ? y_hat : y, packed, med,
                        seed_tensor.has_value() ? *seed_tensor : at::Tensor()};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["mode"] = save_y_hat ? int64_t{2} : mode;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["rho"] = rho;
    ctx->saved_data["s"] = s;
    ctx->saved_data["bound"] = bound;
    ctx->saved_data["need_likelihood"] = need_likelihood;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["has_medians"] = medians.has_value() && medians->defined();
    ctx->saved_data["groups"] = groups;
    if (!need_likelihood) ctx->mark_non_differentiable({lik});
    return {y_hat, rate, lik};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor& packed = saved[1];
    const at::Tensor& med = saved[2];
    const std::optional<at::Tensor> seed_tensor =
        saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const std::vector<at::Tensor> params(saved.begin() + 4, saved.end());
    const auto& d = ctx->saved_data;
    const at::Tensor none = at::empty({0}, packed.options());
    // Output gradients in the kernels' dtypes, contiguous (autograd may hand over
    // expanded ones); absent = an empty tensor (zero).
    const at::Tensor gyh =
        grads[0].defined() ? cifd_bind::as_dtype(grads[0], y.scalar_type()).contiguous()
                           : at::empty({0}, y.options());
    const at::Tensor grate =
        grads[1].defined() ? cifd_bind::as_dtype(grads[1], packed.scalar_type()).contiguous() : none;
    const at::Tensor glik = d.at("need_likelihood").toBool() && grads[2].defined()
                                ? cifd_bind::as_dtype(grads[2], packed.scalar_type()).contiguous()
                                : none;
    const int64_t mode = d.at("mode").toInt(), seed = d.at("seed").toInt(),
                  offset = d.at("offset").toInt(), groups = d.at("groups").toInt();
    const double rho = d.at("rho").toDouble(), s = d.at("s").toDouble(),
                 bound = d.at("bound").toDouble();
    const bool det = d.at("deterministic").toBool();
    auto [grad_y, grad_packed] =
        ops().bwd.call(y, packed, med, gyh, grate, glik, mode, seed, offset, rho, s, bound, det,
                       groups, seed_tensor);
    const std::vector<at::Tensor> gparams = ops().unpack.call(grad_packed, params);
    variable_list out;
    out.reserve(1 + gparams.size() + 1 + 11);
    out.push_back(grad_y);
    out.insert(out.end(), gparams.begin(), gparams.end());
    out.push_back(d.at("has_medians").toBool() ? grad_packed.select(0, kNumPacked) : at::Tensor());
    out.resize(out.size() + 11);  // mode .. seed_tensor: not differentiable
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_autograd(
    const at::Tensor& y, at::TensorList params, const std::optional<at::Tensor>& medians,
    int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound,
    bool need_likelihood, bool deterministic, bool save_y_hat, int64_t groups,
    const std::optional<at::Tensor>& seed_tensor) {
  variable_list out = Fused::apply(y, params, medians, mode, seed, offset, rho, s, bound,
                                   need_likelihood, deterministic, save_y_hat, groups,
                                   seed_tensor);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def(
      "entropy_bottleneck_fused(Tensor y, Tensor[] params, Tensor? medians, int mode, int seed, "
      "int offset, float rho, float s, float bound, bool need_likelihood, bool deterministic, "
      "bool save_y_hat, int groups=0, Tensor? seed_tensor=None) -> (Tensor y_hat, Tensor rate, "
      "Tensor likelihood)");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) { m.impl("entropy_bottleneck_fused", &fused_plain); }

TORCH_LIBRARY_IMPL(cifd_C, AutogradCPU, m) {
  m.impl("entropy_bottleneck_fused", &fused_autograd);
}

// CUDA: the same op over the CUDA kernels and the generic (ATen) density pack (which the
// CPU tests run as cifd_C::density_pack_generic). tools/gpu_check.sh runs it on a GPU.
#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) { m.impl("entropy_bottleneck_fused", &fused_plain); }

TORCH_LIBRARY_IMPL(cifd_C, AutogradCUDA, m) {
  m.impl("entropy_bottleneck_fused", &fused_autograd);
}
#endif
