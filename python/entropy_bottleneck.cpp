// SPDX-License-Identifier: Apache-2.0
// cifd_C::entropy_bottleneck_fwd / entropy_bottleneck_bwd: checks, then the raw
// CPU or CUDA kernels (csrc/cpu/entropy_bottleneck.cpp, csrc/cuda/entropy_bottleneck.cu).
//
//   entropy_bottleneck_fwd(y, packed, medians, mode, seed, offset, rho, s, bound,
//                          need_likelihood) -> (y_hat, rate, likelihood)
//   entropy_bottleneck_bwd(y, packed, medians, grad_y_hat, grad_rate, grad_likelihood,
//                          mode, seed, offset, rho, s, bound, deterministic)
//                          -> (grad_y, grad_packed)
//
// y [N, C, *spatial] contiguous float32/float16/bfloat16, or float64 on the CPU;
// packed [58, C] (cifd_kernels/ops/density_pack.py) in the compute dtype
// (float64 for float64 y, else float32); medians [C] in the compute dtype in mode
// 1 (dequantize), ignored otherwise (pass an empty tensor); mode 0 noise, 1
// dequantize, 2 none. y_hat: y's dtype and shape; rate [N] nats over kept
// elements and likelihood (y's shape, or an empty tensor unless need_likelihood)
// in the compute dtype. Backward: grad_y_hat (y's dtype and shape), grad_rate
// ([N]) and grad_likelihood (y's shape), both in the compute dtype, may each be
// an empty tensor (= zero); all contiguous. grad_y: y's dtype and shape;
// grad_packed [59, C] in the compute dtype (row 58: medians, dequantize mode;
// zero otherwise).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "checks.h"
#include "cifd/kernels.h"

#ifdef CIFD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using cifd_bind::check_offset_range;
using cifd_bind::check_u63;

constexpr int64_t kNumPacked = 58;
constexpr int64_t kNumGrad = 59;

// y's storage type for the kernels; float64 (CPU only) is handled by the
// float64 entry points and reported as kFloat32 here (EbProblem.dtype is not read).
cifd::EbDtype eb_dtype(const at::Tensor& y) {
  switch (y.scalar_type()) {
    case at::kFloat: return cifd::EbDtype::kFloat32;
    case at::kHalf: return cifd::EbDtype::kFloat16;
    case at::kBFloat16: return cifd::EbDtype::kBFloat16;
    case at::kDouble:
      TORCH_CHECK(y.device().is_cpu(),
                  "y must be float32, float16 or bfloat16 on CUDA, got Double (float64 runs on "
                  "the CPU kernel or the reference backend)");
      return cifd::EbDtype::kFloat32;
    default:
      TORCH_CHECK(false, "y must be float32, float16 or bfloat16 (or float64 on the CPU), got ",
                  y.scalar_type());
  }
}

// Everything forward and backward share, checked once: the problem and the
// compute dtype (float64 for float64 y, else float32).
struct Prepared {
  cifd::EbProblem pr;
  at::ScalarType cdt;
  bool f64() const { return cdt == at::kDouble; }
};

Prepared prepare(const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians,
                 int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound) {
  const cifd::EbDtype dt = eb_dtype(y);
  const at::ScalarType cdt = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(y.dim() >= 2, "y must be [N, C, *spatial] with at least 2 dims, got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous");
  const int64_t N = y.size(0), C = y.size(1);
  const char* cdt_name = cdt == at::kDouble ? "float64" : "float32";
  TORCH_CHECK(packed.scalar_type() == cdt, "packed must be ", cdt_name, " (the compute dtype of ",
              y.scalar_type(), " y), got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == kNumPacked && packed.size(1) == C,
              "packed must be [", kNumPacked, ", ", C, "] (pack_density), got ", packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  TORCH_CHECK(packed.device() == y.device(), "packed is on ", packed.device(), " but y is on ",
              y.device());
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (noise), 1 (dequantize) or 2 (none), got ",
              mode);
  if (mode == 1) {
    TORCH_CHECK(medians.scalar_type() == cdt, "medians must be ", cdt_name, ", got ",
                medians.scalar_type());
    TORCH_CHECK(medians.dim() == 1 && medians.size(0) == C, "medians must be [", C, "], got ",
                medians.sizes());
    TORCH_CHECK(medians.is_contiguous(), "medians must be contiguous");
    TORCH_CHECK(medians.device() == y.device(), "medians is on ", medians.device(),
                " but y is on ", y.device());
  }
  check_u63(seed, "seed");
  check_u63(offset, "offset");
  check_offset_range(offset, y.numel());
  TORCH_CHECK(rho >= 0.0 && rho <= 1.0, "rho must be in [0, 1], got ", rho);
  TORCH_CHECK(std::isfinite(s), "s must be finite, got ", s);
  TORCH_CHECK(!std::isnan(bound), "bound must not be NaN");
  Prepared out;
  cifd::EbProblem& pr = out.pr;
  pr.N = N;
  pr.C = C;
  pr.S = (N > 0 && C > 0) ? y.numel() / (N * C) : 1;
  pr.mode = static_cast<int>(mode);
  pr.dtype = dt;
  pr.seed = static_cast<uint64_t>(seed);
  pr.offset = static_cast<uint64_t>(offset);
  pr.rho = static_cast<float>(rho);
  pr.s = static_cast<float>(s);
  pr.bound = static_cast<float>(bound);
  out.cdt = cdt;
  return out;
}

// An optional gradient input: empty = absent (nullptr), else checked.
const void* opt_grad(const at::Tensor& g, const char* name, const at::Tensor& like,
                     at::IntArrayRef shape, at::ScalarType dtype) {
  if (g.numel() == 0) return nullptr;  // absent: zero
  TORCH_CHECK(g.scalar_type() == dtype, name, " must be ", dtype, ", got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == shape, name, " must have shape ", shape, " (or be empty), got ",
              g.sizes());
  TORCH_CHECK(g.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(g.device() == like.device(), name, " is on ", g.device(), " but y is on ",
              like.device());
  return g.data_ptr();
}

const void* medians_ptr(const at::Tensor& medians, int64_t mode) {
  return mode == 1 ? medians.data_ptr() : nullptr;
}

// Forward: checks, outputs allocated.
struct Fwd {
  Prepared p;
  at::Tensor y_hat, rate, lik;
  const void* med;
  void* lik_ptr;  // null unless need_likelihood
};

Fwd prepare_fwd(const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians,
                int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound,
                bool need_likelihood) {
  Fwd f;
  f.p = prepare(y, packed, medians, mode, seed, offset, rho, s, bound);
  f.y_hat = at::empty(y.sizes(), y.options());
  f.rate = at::empty({y.size(0)}, y.options().dtype(f.p.cdt));
  f.lik = at::empty(need_likelihood ? y.sizes() : at::IntArrayRef({0}), y.options().dtype(f.p.cdt));
  f.med = medians_ptr(medians, mode);
  f.lik_ptr = need_likelihood ? f.lik.data_ptr() : nullptr;
  return f;
}

// Backward: checks (forward's and the gradients'), outputs allocated.
struct Bwd {
  Prepared p;
  const void* med;
  const void* gyh;
  const void* grate;
  const void* glik;
  at::Tensor grad_y, grad_packed;
};

Bwd prepare_bwd(const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians,
                const at::Tensor& grad_y_hat, const at::Tensor& grad_rate,
                const at::Tensor& grad_likelihood, int64_t mode, int64_t seed, int64_t offset,
                double rho, double s, double bound) {
  Bwd b;
  b.p = prepare(y, packed, medians, mode, seed, offset, rho, s, bound);
  b.med = medians_ptr(medians, mode);
  b.gyh = opt_grad(grad_y_hat, "grad_y_hat", y, y.sizes(), y.scalar_type());
  const int64_t n = y.size(0);
  b.grate = opt_grad(grad_rate, "grad_rate", y, at::IntArrayRef(&n, 1), b.p.cdt);
  b.glik = opt_grad(grad_likelihood, "grad_likelihood", y, y.sizes(), b.p.cdt);
  b.grad_y = at::empty(y.sizes(), y.options());
  b.grad_packed = at::empty({kNumGrad, y.size(1)}, y.options().dtype(b.p.cdt));
  return b;
}

template <class T>
const T* cptr(const void* p) {
  return static_cast<const T*>(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& y, const at::Tensor& packed,
                                                       const at::Tensor& medians, int64_t mode,
                                                       int64_t seed, int64_t offset, double rho,
                                                       double s, double bound,
                                                       bool need_likelihood) {
  Fwd f = prepare_fwd(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood);
  const int threads = at::get_num_threads();
  if (f.p.f64()) {
    cifd::cpu::entropy_bottleneck_fwd(f.p.pr, s, bound, y.data_ptr<double>(),
                                      packed.data_ptr<double>(), cptr<double>(f.med),
                                      f.y_hat.data_ptr<double>(), f.rate.data_ptr<double>(),
                                      static_cast<double*>(f.lik_ptr), threads);
  } else {
    cifd::cpu::entropy_bottleneck_fwd(f.p.pr, y.data_ptr(), packed.data_ptr<float>(),
                                      cptr<float>(f.med), f.y_hat.data_ptr(),
                                      f.rate.data_ptr<float>(), static_cast<float*>(f.lik_ptr),
                                      threads);
  }
  return {f.y_hat, f.rate, f.lik};
}

std::tuple<at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& y, const at::Tensor& packed,
                                           const at::Tensor& medians, const at::Tensor& grad_y_hat,
                                           const at::Tensor& grad_rate,
                                           const at::Tensor& grad_likelihood, int64_t mode,
                                           int64_t seed, int64_t offset, double rho, double s,
                                           double bound, bool deterministic) {
  Bwd b = prepare_bwd(y, packed, medians, grad_y_hat, grad_rate, grad_likelihood, mode, seed,
                      offset, rho, s, bound);
  const int threads = at::get_num_threads();
  if (b.p.f64()) {
    cifd::cpu::entropy_bottleneck_bwd(b.p.pr, s, bound, y.data_ptr<double>(),
                                      packed.data_ptr<double>(), cptr<double>(b.med),
                                      cptr<double>(b.gyh), cptr<double>(b.grate),
                                      cptr<double>(b.glik), b.grad_y.data_ptr<double>(),
                                      b.grad_packed.data_ptr<double>(), threads);
  } else {
    cifd::cpu::entropy_bottleneck_bwd(b.p.pr, y.data_ptr(), packed.data_ptr<float>(),
                                      cptr<float>(b.med), b.gyh, cptr<float>(b.grate),
                                      cptr<float>(b.glik), b.grad_y.data_ptr(),
                                      b.grad_packed.data_ptr<float>(), deterministic, threads);
  }
  return {b.grad_y, b.grad_packed};
}

#ifdef CIFD_WITH_CUDA
int num_sms(const at::Tensor& y) {
  return at::cuda::getDeviceProperties(y.device().index())->multiProcessorCount;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& y, const at::Tensor& packed,
                                                        const at::Tensor& medians, int64_t mode,
                                                        int64_t seed, int64_t offset, double rho,
                                                        double s, double bound,
                                                        bool need_likelihood) {
  const c10::cuda::CUDAGuard guard(y.device());
  Fwd f = prepare_fwd(y, packed, medians, mode, seed, offset, rho, s, bound, need_likelihood);
  const int sms = num_sms(y);
  const int64_t ws = cifd::cuda::entropy_bottleneck_fwd_workspace(f.p.pr, sms);
  at::Tensor work = at::empty({ws > 0 ? ws : 1}, y.options().dtype(at::kFloat));
  const int err = cifd::cuda::entropy_bottleneck_fwd(
      f.p.pr, y.data_ptr(), packed.data_ptr<float>(), cptr<float>(f.med), f.y_hat.data_ptr(),
      f.rate.data_ptr<float>(), static_cast<float*>(f.lik_ptr), work.data_ptr<float>(), sms,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {f.y_hat, f.rate, f.lik};
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& y, const at::Tensor& packed,
                                            const at::Tensor& medians, const at::Tensor& grad_y_hat,
                                            const at::Tensor& grad_rate,
                                            const at::Tensor& grad_likelihood, int64_t mode,
                                            int64_t seed, int64_t offset, double rho, double s,
                                            double bound, bool deterministic) {
  const c10::cuda::CUDAGuard guard(y.device());
  Bwd b = prepare_bwd(y, packed, medians, grad_y_hat, grad_rate, grad_likelihood, mode, seed,
                      offset, rho, s, bound);
  const int sms = num_sms(y);
  const int64_t ws = cifd::cuda::entropy_bottleneck_bwd_workspace(b.p.pr, deterministic, sms);
  at::Tensor work = at::empty({ws > 0 ? ws : 1}, y.options().dtype(at::kFloat));
  const int err = cifd::cuda::entropy_bottleneck_bwd(
      b.p.pr, y.data_ptr(), packed.data_ptr<float>(), cptr<float>(b.med), b.gyh,
      cptr<float>(b.grate), cptr<float>(b.glik), b.grad_y.data_ptr(),
      b.grad_packed.data_ptr<float>(), deterministic, work.data_ptr<float>(), sms,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.grad_y, b.grad_packed};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def(
      "entropy_bottleneck_fwd(Tensor y, Tensor packed, Tensor medians, int mode, int seed, "
      "int offset, float rho, float s, float bound, bool need_likelihood) "
      "-> (Tensor y_hat, Tensor rate, Tensor likelihood)");
  m.def(
      "entropy_bottleneck_bwd(Tensor y, Tensor packed, Tensor medians, Tensor grad_y_hat, "
      "Tensor grad_rate, Tensor grad_likelihood, int mode, int seed, int offset, float rho, "
      "float s, float bound, bool deterministic) -> (Tensor grad_y, Tensor grad_packed)");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) {
  m.impl("entropy_bottleneck_fwd", &fwd_cpu);
  m.impl("entropy_bottleneck_bwd", &bwd_cpu);
}

#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) {
  m.impl("entropy_bottleneck_fwd", &fwd_cuda);
  m.impl("entropy_bottleneck_bwd", &bwd_cuda);
}
#endif
