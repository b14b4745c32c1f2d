# SPDX-License-Identifier: Apache-2.0
"""The eager fast path of the ops registered in Python.

Those are the Triton kernels of the entropy op and the loss, and the philox,
density-pack and ``rdm_linear`` ops on every backend: ``torch.library`` custom ops
(and ``triton_op``s), which is what ``torch.compile``, ``opcheck`` and
``torch.export`` see. Called eagerly, though, a
Python custom op with registered autograd costs about 0.1-0.3 ms of dispatch on the
host per call (schema handling, pytree flattening, a generated autograd.Function
around a redispatch), more than the fused kernels themselves at CIFD's small sizes:
one IBM fwd+bwd at [128, 32] took 1.9 ms through the ops against 0.35 ms for its two
kernels. Outside compilation the ops layer therefore calls the *same*
implementation and backward functions through one plain ``torch.autograd.Function``:
same kernels, same bits, a fraction of the overhead.
``backend.set_kernel_options(eager_via_ops=True)`` routes eager calls through the
registered ops instead (the tests compare both). (The entropy op and the loss on
the C++ backends need none of this: their autograd is C++, one route eager and
traced.)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .. import backend as _backend
from ..reference.philox import seed_value

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def via_ops(t: Optional[torch.Tensor] = None) -> bool:
    """True when calls must go through the registered custom ops: while
    ``torch.compile`` traces, under any other tracing (a Python dispatch mode
    such as ``make_fx``'s, or ``t`` a tensor subclass such as a FakeTensor), or
    when the ``eager_via_ops`` kernel option is set."""
    return (_backend.get_kernel_options().eager_via_ops or torch.compiler.is_compiling()
            or (t is not None and type(t) not in _PLAIN)
            or _current_dispatch_mode() is not None)


def autograd_function(name: str, impl: Callable, setup_context: Callable, backward: Callable,
                      materialize_grads: bool = False) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``impl(*args)`` forward, the op's
    ``setup_context(ctx, inputs, output)``, and ``backward(ctx, *grads)``: the
    op's backward formula over the backward *implementation* (the registered
    one calls the backward op): the op's autograd, without custom-op dispatch.

    Unless ``materialize_grads``, an output that got no gradient reaches ``backward``
    as None, not as a zero-filled tensor of its size (the loss op's saved-gradient
    outputs are [G, B, K]), which the loss's backward formula takes for any output.
    With it, zeros, as the registered op's autograd hands them: the entropy op's
    Triton backward then launches the same kernel specialization on both routes."""
    def forward(ctx, *args):
        ctx.set_materialize_grads(materialize_grads)
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def call(op: Callable, function: type[torch.autograd.Function], *args):
    """``op(*args)`` when :func:`via_ops` (``args[0]`` the first tensor), else
    ``function.apply(*args)``."""
    if via_ops(args[0]):
        return op(*args)
    return function.apply(*args)


def eager_seed(seed, t: Optional[torch.Tensor] = None):
    """``seed`` as the op goes on with it: a seed tensor is read at once, as a checked int,
    when nothing traces (a 0-dim CPU tensor: no device sync); while tracing it stays a
    tensor, for the kernels' op to read at run time or the reference's torch ops to
    compute with. An int passes through."""
    if isinstance(seed, torch.Tensor) and not via_ops(t):
        return seed_value(seed)
    return seed
