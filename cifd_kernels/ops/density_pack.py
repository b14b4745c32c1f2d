# SPDX-License-Identifier: Apache-2.0
"""Packed per-channel density parameters shared by every fused entropy-bottleneck
kernel (Triton, CUDA, C++ CPU).

Fast path ``filters=(3, 3, 3, 3)`` (widths 1-3-3-3-3-1). Packing turns the
CompressAI-layout parameters into one contiguous tensor [58, C] (row-major: row
r, channel c at ``r * C + c``) holding ``softplus(H_k)``, ``b_k`` and
``tanh(a_k)``; the kernels' backward returns the gradient w.r.t. these rows
([58, C], plus a medians row 58 in dequantize mode), and unpacking chains it back
to ``H_k`` (x sigmoid(H_k), 1 above softplus' threshold of 20) and ``a_k``
(x (1 - tanh(a_k)^2)).

One registered pair does both, ``cifd_C::density_pack`` /
``cifd_C::density_unpack_grad`` (python/density_pack.cpp: the C++ kernel on the
CPU, ATen ops on CUDA tensors). The fused C++ entropy op calls them inside its
own autograd; the Triton route packs through :func:`pack_density`, one autograd
node over the same pair (the same formulas as torch ops where ``_C`` lacks the
device). As ~20 autograd-tracked torch ops forward and ~40 backward, this chain
cost more than the fused kernel itself at the IBM's sizes (B = 128, C = 32: ~0.7
of a 2.1 ms fwd+bwd on the CPU).

Row layout:
  layer 0 (1 -> 3):  W[j] rows 0-2, b[j] 3-5, tanh(a)[j] 6-8
  layer k = 1..3 (3 -> 3), base = 9 + 15 (k - 1):  W[j, i] base + 3j + i,
                     b[j] base + 9 + j, tanh(a)[j] base + 12 + j
  layer 4 (3 -> 1):  W[0, i] rows 54-56, b 57
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import backend as _backend
from .._layout import FAST_FILTERS, MEDIAN_ROW, MODES, NUM_GRAD, NUM_PACKED  # noqa: F401


def supports(matrices: Sequence[torch.Tensor]) -> bool:
    """True when the parameters have the fast path's widths (filters=(3, 3, 3, 3))."""
    widths = [int(m.shape[1]) for m in matrices[:-1]]
    return tuple(widths) == FAST_FILTERS and len(matrices) == 5 and int(matrices[-1].shape[1]) == 1


def _flat(matrices, biases, factors) -> list[torch.Tensor]:
    """H0 b0 a0 H1 b1 a1 H2 b2 a2 H3 b3 a3 H4 b4: the ops' parameter list."""
    out = []
    for k in range(5):
        out += [matrices[k], biases[k]] + ([factors[k]] if k < 4 else [])
    return out


@functools.lru_cache(maxsize=None)
def cpp_devices() -> tuple[str, ...]:
    """The device types ``cifd_C::density_pack`` / ``density_unpack_grad`` run on (none
    without ``_C``). The first call registers their fake kernels (for tracing, here and
    inside the fused C++ entropy op)."""
    if not _backend.has_ext_op("density_pack"):
        return ()
    torch.library.register_fake("cifd_C::density_pack")(
        lambda params, float64: params[0].new_empty((NUM_PACKED, params[0].shape[0]),
                                                    dtype=torch.float64 if float64 else torch.float32))
    torch.library.register_fake("cifd_C::density_unpack_grad")(
        lambda grad_packed, params: [torch.empty_like(p) for p in params])
    return ("cpu", "cuda") if getattr(_backend.ext(), "WITH_CUDA", False) else ("cpu",)


@torch.compiler.assume_constant_result
def _cpp_devices_traced() -> tuple[str, ...]:
    return cpp_devices()


def _pack(params: list[torch.Tensor], float64: bool, cpp: bool) -> torch.Tensor:
    if cpp:
        return torch.ops.cifd_C.density_pack(params, float64)
    dt, C = (torch.float64 if float64 else torch.float32), params[0].shape[0]
    cols = [p.to(dt).reshape(C, -1) for p in params]
    cols = [F.softplus(p) if i % 3 == 0 else torch.tanh(p) if i % 3 == 2 else p for i, p in enumerate(cols)]
    return torch.cat(cols, 1).t().contiguous()


def _unpack(grad_packed: torch.Tensor, params: list[torch.Tensor], cpp: bool) -> list[torch.Tensor]:
    if cpp:
        return torch.ops.cifd_C.density_unpack_grad(grad_packed, params)
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


class _Pack(torch.autograd.Function):
    """packed = pack(params); its backward unpacks. Params travel flattened (an
    autograd.Function takes no tensor lists); eagerly and under tracing alike."""

    @staticmethod
    def forward(ctx, float64, cpp, *params):
        ctx.save_for_backward(*params)  # the parameters themselves: nothing is copied
        ctx.cpp = cpp
        return _pack(list(params), float64, cpp)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *_unpack(grad.contiguous(), list(ctx.saved_tensors), ctx.cpp))


def _use_cpp(t: torch.Tensor) -> bool:
    devices = _cpp_devices_traced() if torch.compiler.is_compiling() else cpp_devices()
    return t.device.type in devices


def pack_density(matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 factors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CompressAI-layout parameters (filters=(3, 3, 3, 3)) -> packed [58, C] in ``dtype``
    (float32; float64 for the C++ CPU kernel's float64 path).

    Differentiable, as one autograd node whose backward is the unpack: autograd chains
    a kernel's packed gradient back to the parameters; :func:`unpack_density_grad` does
    the same by hand for callers holding a packed gradient. Gradients arrive in each
    parameter's dtype and strides."""
    if not supports(matrices):
        raise ValueError("the fused entropy bottleneck needs filters=(3, 3, 3, 3)")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    params = _flat(matrices, biases, factors)
    return _Pack.apply(dtype == torch.float64, _use_cpp(params[0]), *params)


def unpack_density_grad(grad_packed: torch.Tensor, matrices: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]):
    """Packed gradient [58 or 59, C] -> (grad matrices, grad biases, grad factors), lists in
    the parameters' shapes and dtypes: dH = dW * sigmoid(H), da = dA * (1 - tanh(a)^2)."""
    g = _unpack(grad_packed.contiguous(), _flat(matrices, biases, factors), _use_cpp(grad_packed))
    return [g[3 * k] for k in range(5)], [g[3 * k + 1] for k in range(5)], [g[3 * k + 2] for k in range(4)]
