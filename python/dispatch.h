// SPDX-License-Identifier: Apache-2.0
// Typed handles to registered ops, for binding code that calls other cifd_C:: ops
// through the dispatcher (the fused C++-autograd ops: python/entropy_bottleneck_fused.cpp,
// python/cifd_loss_fused.cpp). Look a handle up once and keep it (a function-local
// static); each call then costs one dispatch.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

namespace cifd_bind {

template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace cifd_bind
