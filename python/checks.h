// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the binding files: each message names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace cifd_bind {

inline void check_contiguous_out(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline uint64_t check_u63(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0, name, " must be in [0, 2**63), got ", v);
  return static_cast<uint64_t>(v);
}

inline void check_offset_range(int64_t offset, int64_t numel) {
  TORCH_CHECK(numel == 0 || offset <= std::numeric_limits<int64_t>::max() - (numel - 1),
              "offset + numel must stay below 2**63 (offset=", offset, ", numel=", numel, ")");
}

// The call's seed: ``seed``, or the value of ``seed_tensor`` when one is given: a 0-dim
// int64 CPU tensor, the seed a module drew inside a traced graph, read here on the host
// where the kernels launch (no device sync), then checked like an int seed.
inline int64_t seed_of(int64_t seed, const std::optional<at::Tensor>& seed_tensor) {
  if (!seed_tensor.has_value() || !seed_tensor->defined()) return seed;
  const at::Tensor& t = *seed_tensor;
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kLong && t.device().is_cpu(),
              "seed_tensor must be a 0-dim int64 CPU tensor, got ", t.dim(), "-dim ",
              t.scalar_type(), " on ", t.device());
  return t.item<int64_t>();
}

}  // namespace cifd_bind
