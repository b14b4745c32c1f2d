# SPDX-License-Identifier: Apache-2.0
"""Packed per-channel density parameters shared by every fused entropy-bottleneck
kernel (Triton, CUDA, C++ CPU).

Fast path ``filters=(3, 3, 3, 3)`` (widths 1-3-3-3-3-1). ``pack_density`` turns the
CompressAI-layout parameters into one contiguous float32 tensor [58, C] (row-major:
row r, channel c at ``r * C + c``) holding ``softplus(H_k)``, ``b_k`` and
``tanh(a_k)``, by the op ``cifd::density_pack`` (the C++ kernel on the CPU, a
Triton kernel on GPUs, torch ops elsewhere); the kernels' backward returns the
gradient w.r.t. these rows ([58, C], plus a medians row 58 in dequantize mode),
and ``cifd::density_unpack_grad`` (the pack op's backward, and
:func:`unpack_density_grad`) chains it back to ``H_k`` (x sigmoid(H_k)) and
``a_k`` (x (1 - tanh(a_k)^2)). One op each way: as ~20 autograd-tracked torch ops
forward and ~40 backward, this chain cost more than the fused kernel itself at
the IBM's sizes (B = 128, C = 32: ~0.7 of a 2.1 ms fwd+bwd on the CPU).

Row layout:
  layer 0 (1 -> 3):  W[j] rows 0-2, b[j] 3-5, tanh(a)[j] 6-8
  layer k = 1..3 (3 -> 3), base = 9 + 15 (k - 1):  W[j, i] base + 3j + i,
                     b[j] base + 9 + j, tanh(a)[j] base + 12 + j
  layer 4 (3 -> 1):  W[0, i] rows 54-56, b 57
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .._layout import FAST_FILTERS, MEDIAN_ROW, MODES, NUM_GRAD, NUM_PACKED  # noqa: F401
from . import _eager


def supports(matrices: Sequence[torch.Tensor]) -> bool:
    """True when the parameters have the fast path's widths (filters=(3, 3, 3, 3))."""
    widths = [int(m.shape[1]) for m in matrices[:-1]]
    return tuple(widths) == FAST_FILTERS and len(matrices) == 5 and int(matrices[-1].shape[1]) == 1


def _flat(matrices, biases, factors) -> list[torch.Tensor]:
    """H0 b0 a0 H1 b1 a1 H2 b2 a2 H3 b3 a3 H4 b4: the op's parameter list."""
    out = []
    for k in range(5):
        out += [matrices[k], biases[k]] + ([factors[k]] if k < 4 else [])
    return out


def _use_cpp(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return False
    from .. import backend
    return backend.has_ext_op("density_pack")


def _use_triton(t: torch.Tensor) -> bool:
    """GPU tensors in float32: the Triton kernels (one launch each way), when Triton runs."""
    if t.device.type != "cuda" or t.dtype == torch.float64:
        return False
    from .. import backend
    return backend.status("triton", "cuda")[0]


def _triton_mod():
    from .._triton import density_pack as m
    return m


def _pack_torch(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    C = params[0].shape[0]
    cols = []
    for i, p in enumerate(params):
        p = p.to(dtype).reshape(C, -1)
        cols.append(F.softplus(p) if i % 3 == 0 else torch.tanh(p) if i % 3 == 2 else p)
    return torch.cat(cols, 1).t().contiguous()


def _pack_impl(params: list[torch.Tensor], float64: bool) -> torch.Tensor:
    if _use_cpp(params[0]):
        return torch.ops.cifd_C.density_pack(params, float64)
    if not float64 and _use_triton(params[0]):
        return _triton_mod().density_pack(params)
    return _pack_torch(params, torch.float64 if float64 else torch.float32)


_pack_op = torch.library.custom_op("cifd::density_pack", mutates_args=())(_pack_impl)


@_pack_op.register_fake
def _fake_pack(params, float64):
    return params[0].new_empty((NUM_PACKED, params[0].shape[0]),
                               dtype=torch.float64 if float64 else torch.float32)


def _unpack_impl(grad_packed: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if _use_cpp(grad_packed):
        return torch.ops.cifd_C.density_unpack_grad(grad_packed, params)
    if _use_triton(grad_packed):
        return _triton_mod().density_unpack_grad(grad_packed, params)
    C = params[0].shape[0]
    g = grad_packed[:NUM_PACKED].t()  # [C, 58]
    out, col = [], 0
    for i, p in enumerate(params):
        n = p.numel() // C if C else 0
        gi = g[:, col:col + n].reshape(p.shape)
        col += n
        if i % 3 == 0:  # softplus'(H) = sigmoid(H), 1 above torch's threshold of 20
            gi = torch.where(p > 20, gi, gi * torch.sigmoid(p.to(gi.dtype)))
        elif i % 3 == 2:
            gi = gi * (1.0 - torch.tanh(p.to(gi.dtype)) ** 2)
        out.append(torch.empty_like(p).copy_(gi))  # the parameter's dtype and strides
    return out


_unpack_op = torch.library.custom_op("cifd::density_unpack_grad", mutates_args=())(_unpack_impl)


@_unpack_op.register_fake
def _fake_unpack(grad_packed, params):
    return [torch.empty_like(p) for p in params]


def register_cpp_fakes() -> None:
    """Fake kernels of ``cifd_C::density_pack`` / ``density_unpack_grad``, which the fused C++
    entropy op calls (so that tracing runs through it); once, when ``_C`` has them."""
    torch.library.register_fake("cifd_C::density_pack")(_fake_pack)
    torch.library.register_fake("cifd_C::density_unpack_grad")(_fake_unpack)


def _pack_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])  # the parameters themselves: nothing is copied


def _pack_backward(ctx, grad):
    return _unpack_op(grad.contiguous(), list(ctx.saved_tensors)), None


_pack_op.register_autograd(_pack_backward, setup_context=_pack_setup)


class _PackFunction(torch.autograd.Function):
    """The eager path (see :mod:`._eager`); params travel flattened, as
    autograd.Function takes no tensor lists."""

    @staticmethod
    def forward(ctx, float64, *params):
        ctx.save_for_backward(*params)
        return _pack_impl(list(params), float64)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_unpack_impl(grad.contiguous(), list(ctx.saved_tensors)))


def pack_density(matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 factors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CompressAI-layout parameters (filters=(3, 3, 3, 3)) -> packed [58, C] in ``dtype``
    (float32; float64 for the C++ CPU kernel's float64 path).

    Differentiable, as one autograd node (the ``cifd::density_pack`` op: the C++
    kernel on the CPU, torch ops elsewhere) whose backward is
    ``cifd::density_unpack_grad``: autograd chains a kernel's packed gradient
    back to the parameters; :func:`unpack_density_grad` does the same by hand for
    callers holding a packed gradient. Gradients arrive in each parameter's
    dtype and strides."""
    if not supports(matrices):
        raise ValueError("the fused entropy bottleneck needs filters=(3, 3, 3, 3)")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    params = _flat(matrices, biases, factors)
    if _eager.via_ops(params[0]):
        return _pack_op(params, dtype == torch.float64)
    return _PackFunction.apply(dtype == torch.float64, *params)


def unpack_density_grad(grad_packed: torch.Tensor, matrices: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]):
    """Packed gradient [58 or 59, C] -> (grad matrices, grad biases, grad factors), lists in
    the parameters' shapes and dtypes: dH = dW * sigmoid(H), da = dA * (1 - tanh(a)^2)."""
    unpack = _unpack_op if _eager.via_ops(grad_packed) else _unpack_impl
    g = unpack(grad_packed.contiguous(), _flat(matrices, biases, factors))
    gm = [g[3 * k] for k in range(5)]
    gb = [g[3 * k + 1] for k in range(5)]
    gf = [g[3 * k + 2] for k in range(4)]
    return gm, gb, gf
