// SPDX-License-Identifier: Apache-2.0
// cifd_C::entropy_bottleneck_fwd / entropy_bottleneck_bwd: checks, then the raw
// CPU or CUDA kernels (csrc/cpu/entropy_bottleneck.cpp, csrc/cuda/entropy_bottleneck.cu).
//
//   entropy_bottleneck_fwd(y, packed, medians, mode, seed, offset, rho, s, bound,
//                          need_likelihood, groups=0, seed_tensor=None)
//                          -> (y_hat, rate, likelihood)
//   entropy_bottleneck_bwd(y, packed, medians, grad_y_hat, grad_rate, grad_likelihood,
//                          mode, seed, offset, rho, s, bound, deterministic, groups=0,
//                          seed_tensor=None) -> (grad_y, grad_packed)
//
// seed_tensor, when given, is the seed instead of ``seed``: a 0-dim int64 CPU tensor (a
// seed drawn inside a torch.compile graph), read on the host at run time.
//
// groups = 0, one problem: y [N, C, *spatial] contiguous float32/float16/bfloat16, or float64 on the CPU;
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
//
// groups = G >= 1, G problems in one call (the RDM bank's N latents): y [G, N, C, *spatial], group g
// the problem y[g] on channels g C .. g C + C - 1 of packed [58, G C] (medians
// [G C]), every element at Philox counter offset + its flat index in y. rate and
// grad_rate are [G, N]; grad_packed [59, G C]; the rest as above. The kernels take
// the groups in one call (EbProblem::G): on CUDA one launch each way, on the CPU one
// group after another. Either way the bits of G calls.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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

// The kernels' compute dtype for y: float64 for float64 y, else float32.
at::ScalarType compute_dtype(const at::Tensor& y) {
  return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Everything forward and backward share, checked once: the problem and the
// compute dtype (float64 for float64 y, else float32).
struct Prepared {
  cifd::EbProblem pr;
  at::ScalarType cdt;
  bool f64() const { return cdt == at::kDouble; }
};

// The kernel choices EbProblem carries besides the problem (cpu_avx2,
// cuda_bwd_min_blocks), for every later call: set only through
// cifd_C::set_kernel_options, which cifd_kernels.backend.kernel_options calls (no
// environment is read). Atomic: a setter may race a launch on another thread.
std::atomic<bool> g_cpu_avx2{true};
std::atomic<int> g_cuda_bwd_min_blocks{1};

void set_kernel_options(bool cpu_avx2, int64_t cuda_bwd_min_blocks) {
  TORCH_CHECK(cuda_bwd_min_blocks == 1 || cuda_bwd_min_blocks == 2,
              "cuda_bwd_min_blocks must be 1 or 2, got ", cuda_bwd_min_blocks);
  g_cpu_avx2.store(cpu_avx2);
  g_cuda_bwd_min_blocks.store(static_cast<int>(cuda_bwd_min_blocks));
}

// groups > 0: y is [G, N, C, *spatial] (G = groups) and packed / medians cover G C
// channels: the kernels' groups (EbProblem::G).
Prepared prepare(const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians,
                 int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound,
                 int64_t groups = 0) {
  const cifd::EbDtype dt = eb_dtype(y);
  const at::ScalarType cdt = compute_dtype(y);
  const int64_t lead = groups > 0 ? 1 : 0;  // y's dims before [N, C, ...]
  if (groups > 0) {
    TORCH_CHECK(y.dim() >= 3 && y.size(0) == groups,
                "y must be [G=", groups, ", N, C, *spatial] for groups, got ", y.sizes());
  } else {
    TORCH_CHECK(y.dim() >= 2, "y must be [N, C, *spatial] with at least 2 dims, got ", y.sizes());
  }
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous");
  const int64_t G = groups > 0 ? groups : 1;
  const int64_t N = y.size(lead), C = y.size(lead + 1);
  const char* cdt_name = cdt == at::kDouble ? "float64" : "float32";
  TORCH_CHECK(packed.scalar_type() == cdt, "packed must be ", cdt_name, " (the compute dtype of ",
              y.scalar_type(), " y), got ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == kNumPacked && packed.size(1) == G * C,
              "packed must be [", kNumPacked, ", ", groups > 0 ? "G*C=" : "", G * C,
              "] (pack_density), got ", packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "packed must be contiguous");
  TORCH_CHECK(packed.device() == y.device(), "packed is on ", packed.device(), " but y is on ",
              y.device());
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (noise), 1 (dequantize) or 2 (none), got ",
              mode);
  if (mode == 1) {
    TORCH_CHECK(medians.scalar_type() == cdt, "medians must be ", cdt_name, ", got ",
                medians.scalar_type());
    TORCH_CHECK(medians.dim() == 1 && medians.size(0) == G * C, "medians must be [",
                groups > 0 ? "G*C=" : "", G * C, "], got ", medians.sizes());
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
  pr.S = (N > 0 && C > 0) ? y.numel() / (G * N * C) : 1;
  pr.G = G;
  pr.mode = static_cast<int>(mode);
  pr.dtype = dt;
  pr.seed = static_cast<uint64_t>(seed);
  pr.offset = static_cast<uint64_t>(offset);
  pr.rho = static_cast<float>(rho);
  pr.s = static_cast<float>(s);
  pr.bound = static_cast<float>(bound);
  pr.cpu_avx2 = g_cpu_avx2.load();
  pr.cuda_bwd_min_blocks = g_cuda_bwd_min_blocks.load();
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

// rate's shape: [N], or [G, N] with groups.
std::vector<int64_t> rate_shape(const at::Tensor& y, int64_t groups) {
  return groups > 0 ? std::vector<int64_t>{groups, y.size(1)} : std::vector<int64_t>{y.size(0)};
}

// Outputs: y_hat like y, rate, likelihood like y or empty.
struct FwdOut {
  at::Tensor y_hat, rate, lik;
};

FwdOut alloc_fwd(const at::Tensor& y, at::ScalarType cdt, bool need_likelihood, int64_t groups) {
  return {at::empty(y.sizes(), y.options()), at::empty(rate_shape(y, groups), y.options().dtype(cdt)),
          at::empty(need_likelihood ? y.sizes() : at::IntArrayRef({0}), y.options().dtype(cdt))};
}

// Backward's gradient inputs, checked (null = absent).
struct BwdIn {
  const void* gyh;
  const void* grate;
  const void* glik;
};

BwdIn check_bwd_inputs(const Prepared& p, const at::Tensor& y, const at::Tensor& grad_y_hat,
                       const at::Tensor& grad_rate, const at::Tensor& grad_likelihood,
                       int64_t groups) {
  return {opt_grad(grad_y_hat, "grad_y_hat", y, y.sizes(), y.scalar_type()),
          opt_grad(grad_rate, "grad_rate", y, rate_shape(y, groups), p.cdt),
          opt_grad(grad_likelihood, "grad_likelihood", y, y.sizes(), p.cdt)};
}

template <class T>
const T* cptr(const void* p) {
  return static_cast<const T*>(p);
}

// The kernels into given outputs (grad_packed: [59, G C] contiguous).
void fwd_kernel_cpu(const Prepared& p, const at::Tensor& y, const at::Tensor& packed,
                    const at::Tensor& medians, double s, double bound, FwdOut& o) {
  const void* med = medians_ptr(medians, p.pr.mode);
  void* lik = o.lik.numel() > 0 ? o.lik.data_ptr() : nullptr;
  const int threads = at::get_num_threads();
  if (p.f64()) {
    cifd::cpu::entropy_bottleneck_fwd(p.pr, s, bound, y.data_ptr<double>(),
                                      packed.data_ptr<double>(), cptr<double>(med),
                                      o.y_hat.data_ptr<double>(), o.rate.data_ptr<double>(),
                                      static_cast<double*>(lik), threads);
  } else {
    cifd::cpu::entropy_bottleneck_fwd(p.pr, y.data_ptr(), packed.data_ptr<float>(),
                                      cptr<float>(med), o.y_hat.data_ptr(),
                                      o.rate.data_ptr<float>(), static_cast<float*>(lik), threads);
  }
}

void bwd_kernel_cpu(const Prepared& p, const at::Tensor& y, const at::Tensor& packed,
                    const at::Tensor& medians, const BwdIn& g, double s, double bound,
                    bool deterministic, const at::Tensor& grad_y, const at::Tensor& grad_packed) {
  const void* med = medians_ptr(medians, p.pr.mode);
  const int threads = at::get_num_threads();
  if (p.f64()) {
    cifd::cpu::entropy_bottleneck_bwd(p.pr, s, bound, y.data_ptr<double>(),
                                      packed.data_ptr<double>(), cptr<double>(med),
                                      cptr<double>(g.gyh), cptr<double>(g.grate),
                                      cptr<double>(g.glik), grad_y.data_ptr<double>(),
                                      grad_packed.data_ptr<double>(), threads);
  } else {
    cifd::cpu::entropy_bottleneck_bwd(p.pr, y.data_ptr(), packed.data_ptr<float>(),
                                      cptr<float>(med), g.gyh, cptr<float>(g.grate),
                                      cptr<float>(g.glik), grad_y.data_ptr(),
                                      grad_packed.data_ptr<float>(), deterministic, threads);
  }
}

#ifdef CIFD_WITH_CUDA
int num_sms(const at::Tensor& y) {
  return at::cuda::getDeviceProperties(y.device().index())->multiProcessorCount;
}

void fwd_kernel_cuda(const Prepared& p, const at::Tensor& y, const at::Tensor& packed,
                     const at::Tensor& medians, double /*s*/, double /*bound*/, FwdOut& o) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int sms = num_sms(y);
  const int64_t ws = cifd::cuda::entropy_bottleneck_fwd_workspace(p.pr, sms);
  at::Tensor work = at::empty({ws > 0 ? ws : 1}, y.options().dtype(at::kFloat));
  const int err = cifd::cuda::entropy_bottleneck_fwd(
      p.pr, y.data_ptr(), packed.data_ptr<float>(), cptr<float>(medians_ptr(medians, p.pr.mode)),
      o.y_hat.data_ptr(), o.rate.data_ptr<float>(),
      o.lik.numel() > 0 ? o.lik.data_ptr<float>() : nullptr, work.data_ptr<float>(), sms,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bwd_kernel_cuda(const Prepared& p, const at::Tensor& y, const at::Tensor& packed,
                     const at::Tensor& medians, const BwdIn& g, double /*s*/, double /*bound*/,
                     bool deterministic, const at::Tensor& grad_y, const at::Tensor& grad_packed) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int sms = num_sms(y);
  const int64_t ws = cifd::cuda::entropy_bottleneck_bwd_workspace(p.pr, deterministic, sms);
  at::Tensor work = at::empty({ws > 0 ? ws : 1}, y.options().dtype(at::kFloat));
  const int err = cifd::cuda::entropy_bottleneck_bwd(
      p.pr, y.data_ptr(), packed.data_ptr<float>(), cptr<float>(medians_ptr(medians, p.pr.mode)),
      g.gyh, cptr<float>(g.grate), cptr<float>(g.glik), grad_y.data_ptr(),
      grad_packed.data_ptr<float>(), deterministic, work.data_ptr<float>(), sms,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// ------------------------------------------------------------------ the registered entries
// groups = 0: one problem, y [N, C, *spatial]; G >= 1: y [G, N, C, *spatial], group g the
// problem y[g] on columns g C .. g C + C - 1 of packed [58, G C] (medians [G C]), every
// element at Philox counter offset + its flat index in y; rate [G, N]. The kernels take
// the groups in one call (EbProblem::G): on CUDA one launch each way, on the CPU one
// group after another; either way the bits of G calls.
template <auto kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians, int64_t mode,
    int64_t seed, int64_t offset, double rho, double s, double bound, bool need_likelihood,
    int64_t groups, const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK(groups >= 0, "groups must be >= 0 (0: one problem), got ", groups);
  seed = cifd_bind::seed_of(seed, seed_tensor);
  const Prepared p = prepare(y, packed, medians, mode, seed, offset, rho, s, bound, groups);
  FwdOut o = alloc_fwd(y, p.cdt, need_likelihood, groups);
  kernel(p, y, packed, medians, s, bound, o);
  return {o.y_hat, o.rate, o.lik};
}

template <auto kernel>
std::tuple<at::Tensor, at::Tensor> bwd(
    const at::Tensor& y, const at::Tensor& packed, const at::Tensor& medians,
    const at::Tensor& grad_y_hat, const at::Tensor& grad_rate, const at::Tensor& grad_likelihood,
    int64_t mode, int64_t seed, int64_t offset, double rho, double s, double bound,
    bool deterministic, int64_t groups, const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK(groups >= 0, "groups must be >= 0 (0: one problem), got ", groups);
  seed = cifd_bind::seed_of(seed, seed_tensor);
  const Prepared p = prepare(y, packed, medians, mode, seed, offset, rho, s, bound, groups);
  const BwdIn g = check_bwd_inputs(p, y, grad_y_hat, grad_rate, grad_likelihood, groups);
  at::Tensor grad_y = at::empty(y.sizes(), y.options());
  at::Tensor grad_packed = at::empty({kNumGrad, packed.size(1)}, y.options().dtype(p.cdt));
  kernel(p, y, packed, medians, g, s, bound, deterministic, grad_y, grad_packed);
  return {grad_y, grad_packed};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def("set_kernel_options(bool cpu_avx2, int cuda_bwd_min_blocks) -> ()", &set_kernel_options);
  m.def(
      "entropy_bottleneck_fwd(Tensor y, Tensor packed, Tensor medians, int mode, int seed, "
      "int offset, float rho, float s, float bound, bool need_likelihood, int groups=0, "
      "Tensor? seed_tensor=None) -> (Tensor y_hat, Tensor rate, Tensor likelihood)");
  m.def(
      "entropy_bottleneck_bwd(Tensor y, Tensor packed, Tensor medians, Tensor grad_y_hat, "
      "Tensor grad_rate, Tensor grad_likelihood, int mode, int seed, int offset, float rho, "
      "float s, float bound, bool deterministic, int groups=0, Tensor? seed_tensor=None) "
      "-> (Tensor grad_y, "
      "Tensor grad_packed)");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) {
  m.impl("entropy_bottleneck_fwd", &fwd<&fwd_kernel_cpu>);
  m.impl("entropy_bottleneck_bwd", &bwd<&bwd_kernel_cpu>);
}

#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) {
  m.impl("entropy_bottleneck_fwd", &fwd<&fwd_kernel_cuda>);
  m.impl("entropy_bottleneck_bwd", &bwd<&bwd_kernel_cuda>);
}
#endif
