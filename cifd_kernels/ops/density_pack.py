# SPDX-License-Identifier: Apache-2.0
"""Packed per-channel density parameters shared by every fused entropy-bottleneck
kernel (Triton, CUDA, C++ CPU).

Fast path ``filters=(3, 3, 3, 3)`` (widths 1-3-3-3-3-1). ``pack_density`` turns the
CompressAI-layout parameters into one contiguous float32 tensor [58, C] (row-major:
row r, channel c at ``r * C + c``) holding ``softplus(H_k)``, ``b_k`` and
``tanh(a_k)``, computed here with torch ops; the kernels' backward returns the
gradient w.r.t. these rows ([58, C], plus a medians row 58 in dequantize mode),
and :func:`unpack_density_grad` chains it back to ``H_k`` (x sigmoid(H_k)) and
``a_k`` (x (1 - tanh(a_k)^2)). C is small, so this host-side chain is cheap.

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

FAST_FILTERS = (3, 3, 3, 3)
NUM_PACKED = 58
NUM_GRAD = NUM_PACKED + 1  # + the medians' gradient row (dequantize mode)
MEDIAN_ROW = NUM_PACKED
MODES = {"noise": 0, "dequantize": 1, "none": 2}


def supports(matrices: Sequence[torch.Tensor]) -> bool:
    """True when the parameters have the fast path's widths (filters=(3, 3, 3, 3))."""
    widths = [int(m.shape[1]) for m in matrices[:-1]]
    return tuple(widths) == FAST_FILTERS and len(matrices) == 5 and int(matrices[-1].shape[1]) == 1


class _GradStridesOfInput(torch.autograd.Function):
    """Identity whose backward hands back the gradient with the input's strides.

    The [C, 1, 1] bias's gradient arrives as a view of the packed gradient with
    strides (1, C, C): the same memory order, other strides for the size-1 dims,
    which DDP reports on every step ("grad strides do not match bucket view
    strides") and handles by a slower path."""

    @staticmethod
    def forward(ctx, t):
        ctx.stride = t.stride()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        if g.stride() == ctx.stride:
            return g
        return torch.empty_strided(g.shape, ctx.stride, dtype=g.dtype, device=g.device).copy_(g)


def pack_density(matrices: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 factors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CompressAI-layout parameters (filters=(3, 3, 3, 3)) -> packed [58, C] in ``dtype``
    (float32; float64 for the C++ CPU kernel's float64 path).

    Differentiable torch ops: autograd chains a kernel's packed gradient back to the
    parameters (the op layer relies on this); :func:`unpack_density_grad` does the
    same chain by hand for callers holding a packed gradient."""
    if not supports(matrices):
        raise ValueError("the fused entropy bottleneck needs filters=(3, 3, 3, 3)")
    C = matrices[0].shape[0]
    cols = []
    for k in range(5):
        cols.append(F.softplus(matrices[k].to(dtype)).reshape(C, -1))
        b = biases[k]
        if b.requires_grad and b[0].numel() == 1:
            b = _GradStridesOfInput.apply(b)  # the last layer's [C, 1, 1] bias, see below
        cols.append(b.to(dtype).reshape(C, -1))
        if k < 4:
            cols.append(torch.tanh(factors[k].to(dtype)).reshape(C, -1))
    return torch.cat(cols, 1).t().contiguous()


def unpack_density_grad(grad_packed: torch.Tensor, matrices: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]):
    """Packed gradient [58 or 59, C] -> (grad matrices, grad biases, grad factors), lists in
    the parameters' shapes and dtypes: dH = dW * sigmoid(H), da = dA * (1 - tanh(a)^2)."""
    C = matrices[0].shape[0]
    g = grad_packed[:NUM_PACKED].t()  # [C, 58]
    gm, gb, gf = [], [], []
    col = 0
    for k in range(5):
        H = matrices[k]
        nw = H.shape[1] * H.shape[2]
        gw = g[:, col:col + nw].reshape(H.shape)
        col += nw
        gm.append((gw * torch.sigmoid(H.float())).to(H.dtype))
        nb = biases[k].shape[1]
        gb.append(g[:, col:col + nb].reshape(biases[k].shape).to(biases[k].dtype))
        col += nb
        if k < 4:
            a = factors[k]
            na = a.shape[1]
            ga = g[:, col:col + na].reshape(a.shape)
            col += na
            gf.append((ga * (1.0 - torch.tanh(a.float()) ** 2)).to(a.dtype))
    assert col == NUM_PACKED and C == g.shape[0]
    return gm, gb, gf
