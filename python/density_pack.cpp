// SPDX-License-Identifier: Apache-2.0
// cifd_C::density_pack / density_unpack_grad: checks, then the raw CPU kernels
// (csrc/cpu/density_pack.cpp).
//
//   density_pack(Tensor[] params, bool float64) -> Tensor packed [58, C]
//   density_unpack_grad(Tensor grad_packed, Tensor[] params) -> Tensor[] grads
//
// params: the 14 CompressAI tensors H0 b0 a0 ... H3 b3 a3 H4 b4 (filters
// (3, 3, 3, 3)), each [C, ...] on the CPU, any floating dtype and strides.
// packed is float64 if float64 else float32. grad_packed: [58 or 59, C] float32
// or float64, contiguous (row 58, the medians' gradient, is not read). grads:
// each param's shape, dtype and strides.
//
// On CUDA tensors the two ops run the same formulas as ATen ops (the generic
// versions below, those of cifd_kernels/ops/density_pack.py's torch fallback): the
// fused C++ entropy op (python/entropy_bottleneck_fused.cpp) packs through them on a GPU. They are
// also registered as density_pack_generic / density_unpack_grad_generic for any
// device, so that the CPU tests cover the code the GPU runs.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cifd/kernels.h"

namespace {

constexpr int64_t kNumPacked = 58;
constexpr int kN = cifd::kDensityParams;

// Checks params and returns each one's width (numel / C).
std::array<int64_t, kN> widths_of(at::TensorList params, bool cpu = true) {
  TORCH_CHECK(static_cast<int>(params.size()) == kN, "params must hold the ", kN,
              " density tensors H0 b0 a0 ... H4 b4, got ", params.size());
  TORCH_CHECK(params[0].dim() >= 1, "params[0] must be [C, ...], got a scalar");
  const int64_t C = params[0].size(0);
  std::array<int64_t, kN> w{};
  int64_t rows = 0;
  for (int i = 0; i < kN; ++i) {
    const at::Tensor& p = params[i];
    if (cpu) {
      TORCH_CHECK(p.device().is_cpu(), "params[", i, "] must be on the CPU, got ", p.device());
    } else {
      TORCH_CHECK(p.device() == params[0].device(), "params[", i, "] is on ", p.device(),
                  " but params[0] is on ", params[0].device());
    }
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "params[", i, "] must be floating, got ",
                p.scalar_type());
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == C, "params[", i, "] must be [", C, ", ...], got ",
                p.sizes());
    w[i] = C > 0 ? p.numel() / C : 0;
    rows += w[i];
  }
  TORCH_CHECK(C == 0 || rows == kNumPacked, "params must have filters (3, 3, 3, 3) (", kNumPacked,
              " values per channel), got ", rows);
  return w;
}

template <typename T>
at::Tensor pack_impl(at::TensorList params, const std::array<int64_t, kN>& w, at::ScalarType dt) {
  const int64_t C = params[0].size(0);
  std::vector<at::Tensor> keep;
  std::array<const T*, kN> ptr{};
  for (int i = 0; i < kN; ++i) {
    keep.push_back(params[i].to(dt).contiguous());
    ptr[i] = keep.back().data_ptr<T>();
  }
  at::Tensor out = at::empty({kNumPacked, C}, params[0].options().dtype(dt));
  if (C > 0) cifd::cpu::density_pack(ptr.data(), w.data(), C, out.data_ptr<T>());
  return out;
}

at::Tensor density_pack_cpu(at::TensorList params, bool float64) {
  const auto w = widths_of(params);
  return float64 ? pack_impl<double>(params, w, at::kDouble)
                 : pack_impl<float>(params, w, at::kFloat);
}

template <typename T>
std::vector<at::Tensor> unpack_impl(const at::Tensor& gp, at::TensorList params,
                                    const std::array<int64_t, kN>& w) {
  const int64_t C = params[0].size(0);
  const at::ScalarType dt = gp.scalar_type();
  std::vector<at::Tensor> keep, out;
  std::array<const T*, kN> ptr{};
  std::array<T*, kN> gptr{};
  for (int i = 0; i < kN; ++i) {
    keep.push_back(params[i].to(dt).contiguous());
    ptr[i] = keep.back().data_ptr<T>();
    out.push_back(at::empty(params[i].sizes(), params[i].options().dtype(dt)));
    gptr[i] = out.back().data_ptr<T>();
  }
  if (C > 0) cifd::cpu::density_unpack_grad(gp.data_ptr<T>(), ptr.data(), w.data(), C, gptr.data());
  for (int i = 0; i < kN; ++i) {
    const at::Tensor& p = params[i];
    if (out[i].scalar_type() != p.scalar_type() || out[i].strides() != p.strides()) {
      out[i] = at::empty_like(p).copy_(out[i]);  // the parameter's dtype and strides
    }
  }
  return out;
}

std::vector<at::Tensor> density_unpack_grad_cpu(const at::Tensor& grad_packed,
                                                at::TensorList params) {
  const auto w = widths_of(params);
  const int64_t C = params[0].size(0);
  TORCH_CHECK(grad_packed.device().is_cpu(), "grad_packed must be on the CPU");
  TORCH_CHECK(grad_packed.scalar_type() == at::kFloat || grad_packed.scalar_type() == at::kDouble,
              "grad_packed must be float32 or float64, got ", grad_packed.scalar_type());
  TORCH_CHECK(grad_packed.dim() == 2 && grad_packed.size(0) >= kNumPacked &&
                  grad_packed.size(1) == C,
              "grad_packed must be [58 or 59, ", C, "], got ", grad_packed.sizes());
  const at::Tensor gp = grad_packed.contiguous();
  return gp.scalar_type() == at::kDouble ? unpack_impl<double>(gp, params, w)
                                         : unpack_impl<float>(gp, params, w);
}

// ------------------------------------------------------------------ any device (ATen)
// packed = cat([softplus(H_k) | b_k | tanh(a_k)] as [C, n] columns).t()
at::Tensor density_pack_generic(at::TensorList params, bool float64) {
  const auto w = widths_of(params, /*cpu=*/false);
  const int64_t C = params[0].size(0);
  const at::ScalarType dt = float64 ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> cols;
  for (int i = 0; i < kN; ++i) {
    const at::Tensor p = params[i].to(dt).reshape({C, w[i]});
    cols.push_back(i % 3 == 0 ? at::softplus(p) : i % 3 == 2 ? at::tanh(p) : p);
  }
  return at::cat(cols, 1).t().contiguous();
}

// grads: the packed gradient's columns, times sigmoid(H) (1 above softplus' threshold
// of 20) for the matrices and 1 - tanh(a)^2 for the factors, in each param's dtype
// and strides.
std::vector<at::Tensor> density_unpack_grad_generic(const at::Tensor& grad_packed,
                                                    at::TensorList params) {
  const auto w = widths_of(params, /*cpu=*/false);
  const int64_t C = params[0].size(0);
  TORCH_CHECK(grad_packed.scalar_type() == at::kFloat || grad_packed.scalar_type() == at::kDouble,
              "grad_packed must be float32 or float64, got ", grad_packed.scalar_type());
  TORCH_CHECK(grad_packed.dim() == 2 && grad_packed.size(0) >= kNumPacked &&
                  grad_packed.size(1) == C,
              "grad_packed must be [58 or 59, ", C, "], got ", grad_packed.sizes());
  TORCH_CHECK(grad_packed.device() == params[0].device(), "grad_packed is on ",
              grad_packed.device(), " but the params are on ", params[0].device());
  const at::Tensor g = grad_packed.narrow(0, 0, kNumPacked).t();  // [C, 58]
  std::vector<at::Tensor> out;
  int64_t col = 0;
  for (int i = 0; i < kN; ++i) {
    const at::Tensor& p = params[i];
    at::Tensor gi = g.narrow(1, col, w[i]).reshape(p.sizes());
    col += w[i];
    if (i % 3 == 0) {
      gi = at::where(p > 20, gi, gi * at::sigmoid(p.to(gi.scalar_type())));
    } else if (i % 3 == 2) {
      const at::Tensor t = at::tanh(p.to(gi.scalar_type()));
      gi = gi * (1.0 - t * t);
    }
    out.push_back(at::empty_like(p).copy_(gi));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def("density_pack(Tensor[] params, bool float64) -> Tensor");
  m.def("density_unpack_grad(Tensor grad_packed, Tensor[] params) -> Tensor[]");
  m.def("density_pack_generic(Tensor[] params, bool float64) -> Tensor");
  m.def("density_unpack_grad_generic(Tensor grad_packed, Tensor[] params) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(cifd_C, CompositeExplicitAutograd, m) {
  m.impl("density_pack_generic", &density_pack_generic);
  m.impl("density_unpack_grad_generic", &density_unpack_grad_generic);
}

#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) {
  m.impl("density_pack", &density_pack_generic);
  m.impl("density_unpack_grad", &density_unpack_grad_generic);
}
#endif

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) {
  m.impl("density_pack", &density_pack_cpu);
  m.impl("density_unpack_grad", &density_unpack_grad_cpu);
}
