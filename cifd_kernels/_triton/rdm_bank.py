# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the fused RDM bank: the batched linear layer with bias and
activation fused into the GEMM epilogue (``cifd::rdm_linear``).

The bank's entropy bottleneck and stage-1 loss run through the entropy and loss
kernels (``_triton/entropy_bottleneck.py``, ``_triton/cifd_loss.py``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend as _backend

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # a global a kernel reads: constexpr


# y[n, b, o] = act(sum_i x[n, b, i] W[n, o, i] + c[n, o]); x's n-stride is 0 when the
# N blocks share one input (the bank's first layer). act: 0 none, 1 relu, 2 gelu (erf).
# The pre-activation is stored too for gelu (its backward reads it); relu's backward
# reads y. Backward (in the op layer): g = dy * act'(.), dx = g W, dW = g^T x, dc = sum_b g.
@triton.jit
def _rdm_linear_fwd_kernel(x_ptr, w_ptr, c_ptr, y_ptr, pre_ptr, B, O, I,
                           sx_n, sx_b, sx_i, sw_n, sw_o, sw_i, sy_n, sy_b, sy_o,
                           ACT: tl.constexpr, STORE_PRE: tl.constexpr, ALLOW_TF32: tl.constexpr,
                           UPCAST: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    num_o = tl.cdiv(O, BLOCK_O)
    pb = pid // num_o
    po = pid % num_o
    rb = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    ro = po * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = tl.arange(0, BLOCK_I)
    mb = rb < B
    mo = ro < O
    x_base = x_ptr + n * sx_n
    w_base = w_ptr + n * sw_n
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        ii = i0 + ri
        mi = ii < I
        xt = tl.load(x_base + rb[:, None] * sx_b + ii[None, :] * sx_i, mask=mb[:, None] & mi[None, :],
                     other=0.0)
        wt = tl.load(w_base + ro[None, :] * sw_o + ii[:, None] * sw_i, mask=mo[None, :] & mi[:, None],
                     other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if ALLOW_TF32:
            acc = tl.dot(xt, wt, acc, input_precision="tf32")
        else:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
    c = tl.load(c_ptr + n * O + ro, mask=mo, other=0.0).to(tl.float32)
    acc = acc + c[None, :]
    out_mask = mb[:, None] & mo[None, :]
    offs = n * sy_n + rb[:, None] * sy_b + ro[None, :] * sy_o
    if STORE_PRE:
        tl.store(pre_ptr + offs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * _SQRT1_2))
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def rdm_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int):
    """Launch: x [B, I] (shared) or [N, B, I], weight [N, O, I], bias [N, O] (any
    strides for x and weight) -> (y [N, B, O], pre [N, B, O] if act == 2 else empty)."""
    n, o, i = weight.shape
    b = x.shape[-2]
    bias = bias.contiguous()
    y = x.new_empty((n, b, o))
    pre = torch.empty_like(y) if act == 2 else x.new_empty((0,))
    if y.numel() == 0:
        return y, pre
    if x.dim() == 2:
        sx = (0, x.stride(0), x.stride(1))
    else:
        sx = (x.stride(0), x.stride(1), x.stride(2))
    # fp32 inputs: exact fp32 products unless the user allowed TF32 for matmuls (torch's flag).
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    block_b = 64 if b >= 64 else max(16, triton.next_power_of_2(b))
    block_o = 64 if o >= 64 else max(16, triton.next_power_of_2(o))
    block_i = 32 if i >= 32 else max(16, triton.next_power_of_2(i))
    # TRITON_INTERPRET's numpy dot has no bfloat16: upcast the tiles there (exact products).
    upcast = x.dtype == torch.bfloat16 and _backend.triton_interpret()
    grid = (triton.cdiv(b, block_b) * triton.cdiv(o, block_o), n)
    _rdm_linear_fwd_kernel[grid](
        x, weight, bias, y, pre if act == 2 else y, b, o, i, *sx,
        weight.stride(0), weight.stride(1), weight.stride(2), y.stride(0), y.stride(1), y.stride(2),
        ACT=act, STORE_PRE=act == 2, ALLOW_TF32=tf32, UPCAST=upcast, BLOCK_B=block_b, BLOCK_O=block_o,
        BLOCK_I=block_i, num_warps=4)
    return y, pre
