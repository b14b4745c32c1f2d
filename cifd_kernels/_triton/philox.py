# SPDX-License-Identifier: Apache-2.0
"""Philox uniforms and keep masks with ``tl.randint4x``: the definition every other
backend is held to (docs/METHOD.md section 5)."""
import torch
import triton
import triton.language as tl


# out[i] = uniform(word0(seed, offset + i)); keep[i] = uniform(word1(...)) >= rho.
# uniform(w) = (int32(w) < 0 ? ~int32(w) : int32(w)) * 4.6566127342e-10f.
# No gradient: these are random draws.
@triton.jit(do_not_specialize=("seed", "offset"))  # one variant for every seed and offset
def _philox_uniform_fwd_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, tl.rand(seed, offset + i), mask=m)


@triton.jit(do_not_specialize=("seed", "offset"))
def _philox_keep_mask_fwd_kernel(out_ptr, n, seed, offset, rho, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    _, w1, _, _ = tl.randint4x(seed, offset + i)
    keep = _uniform(w1)
    tl.store(out_ptr + i, (keep >= rho).to(tl.int8), mask=m)


@triton.jit
def _uniform(w):
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * 4.6566127342e-10


_BLOCK = 1024


def philox_uniform(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fill the contiguous float32 tensor ``out`` with uniforms in [0, 1)."""
    n = out.numel()
    if n == 0:
        return
    _philox_uniform_fwd_kernel[(triton.cdiv(n, _BLOCK),)](out, n, seed, offset, BLOCK=_BLOCK)


def philox_keep_mask(out: torch.Tensor, seed: int, offset: int, rho: float) -> None:
    """Fill the contiguous bool tensor ``out`` with keep flags (uniform of word 1 >= rho)."""
    n = out.numel()
    if n == 0:
        return
    _philox_keep_mask_fwd_kernel[(triton.cdiv(n, _BLOCK),)](out.view(torch.int8), n, seed, offset,
                                                           float(rho), BLOCK=_BLOCK)
