// SPDX-License-Identifier: Apache-2.0
// Typed handles to registered ops, for binding code that calls other cifd_C:: ops
// through the dispatcher (the fused C++-autograd ops: python/entropy_bottleneck_fused.cpp,
// python/cifd_loss_fused.cpp). Look a handle up once and keep it (a function-local
// static); each call then costs one dispatch.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace cifd_bind {

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// ``t`` in dtype ``d``: ``t`` itself when it already is, without an aten::to call (which
// would return its input; torch.library.opcheck refuses ops below autograd that do).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType d) {
  return t.scalar_type() == d ? t : t.to(d);
}

}  // namespace cifd_bind
