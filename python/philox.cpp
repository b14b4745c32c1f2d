// SPDX-License-Identifier: Apache-2.0
// cifd_C::philox_uniform_out / philox_keep_mask_out: checks, then the raw
// CPU or CUDA kernel (dispatched on the output's device). philox_keep_mask_out's
// seed_tensor (a 0-dim int64 CPU tensor) stands for seed when given: a seed drawn in a
// traced graph, read on the host at run time (cifd_C::cifd_loss_fused's KD-dropout).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cifd/kernels.h"

#ifdef CIFD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using cifd_bind::check_contiguous_out;
using cifd_bind::check_offset_range;
using cifd_bind::check_u63;

void check_args(const at::Tensor& out, at::ScalarType dtype, int64_t seed, int64_t offset) {
  check_contiguous_out(out, "out", dtype);
  check_u63(seed, "seed");
  check_u63(offset, "offset");
  check_offset_range(offset, out.numel());
}

void check_rho(double rho) {
  TORCH_CHECK(rho >= 0.0 && rho <= 1.0, "rho must be in [0, 1], got ", rho);
}

void philox_uniform_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  check_args(out, at::kFloat, seed, offset);
  cifd::cpu::philox_uniform(out.data_ptr<float>(), out.numel(), seed, offset,
                            at::get_num_threads());
}

void philox_keep_mask_cpu(at::Tensor& out, int64_t seed, int64_t offset, double rho,
                          const std::optional<at::Tensor>& seed_tensor) {
  seed = cifd_bind::seed_of(seed, seed_tensor);
  check_args(out, at::kBool, seed, offset);
  check_rho(rho);
  cifd::cpu::philox_keep_mask(reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), out.numel(), seed,
                              offset, static_cast<float>(rho), at::get_num_threads());
}

#ifdef CIFD_WITH_CUDA
void philox_uniform_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  check_args(out, at::kFloat, seed, offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const int err = cifd::cuda::philox_uniform(out.data_ptr<float>(), out.numel(), seed, offset,
                                             c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox_keep_mask_cuda(at::Tensor& out, int64_t seed, int64_t offset, double rho,
                           const std::optional<at::Tensor>& seed_tensor) {
  seed = cifd_bind::seed_of(seed, seed_tensor);
  check_args(out, at::kBool, seed, offset);
  check_rho(rho);
  const c10::cuda::CUDAGuard guard(out.device());
  const int err = cifd::cuda::philox_keep_mask(reinterpret_cast<uint8_t*>(out.data_ptr<bool>()),
                                               out.numel(), seed, offset, static_cast<float>(rho),
                                               c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifd_C, m) {
  m.def("philox_uniform_out(Tensor(a!) out, int seed, int offset) -> ()");
  m.def(
      "philox_keep_mask_out(Tensor(a!) out, int seed, int offset, float rho, "
      "Tensor? seed_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(cifd_C, CPU, m) {
  m.impl("philox_uniform_out", &philox_uniform_cpu);
  m.impl("philox_keep_mask_out", &philox_keep_mask_cpu);
}

#ifdef CIFD_WITH_CUDA
TORCH_LIBRARY_IMPL(cifd_C, CUDA, m) {
  m.impl("philox_uniform_out", &philox_uniform_cuda);
  m.impl("philox_keep_mask_out", &philox_keep_mask_cuda);
}
#endif
