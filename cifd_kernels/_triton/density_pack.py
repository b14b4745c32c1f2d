# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for ``cifd::density_pack`` / ``cifd::density_unpack_grad`` on GPU
tensors: one launch each way instead of ~12 torch ops forward and ~40 backward.

The 14 CompressAI tensors (H0 b0 a0 ... H4 b4, each [C, n_i]) are read from one
flat buffer ``raw`` (their concatenation, param i at ``C * s_i``, s_i = the first
packed row of param i): packed row r = s_i + j holds element (c, j) of param i
at ``raw[C * s_i + c * n_i + j]``. The table [58, 4] int32 gives per row
(s_i, n_i, j, kind), kind 0 a matrix (softplus), 1 a bias, 2 a factor (tanh).
"""
import torch
import triton
import triton.language as tl

from .._layout import NUM_PACKED

_ROWS = tl.constexpr(NUM_PACKED)  # for the kernels


# packed[r, c] = f_kind(raw[C s + c n + j]), f = softplus (torch's, threshold 20), id, tanh.
# Backward (the unpack kernel): graw = g * f'(raw): sigmoid(raw) (1 above 20), 1, 1 - tanh^2.
@triton.jit
def _density_pack_fwd_kernel(raw_ptr, tab_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = c < C
    for r in range(_ROWS):
        idx, kind = _row(tab_ptr, r, c, C)
        v = tl.load(raw_ptr + idx, mask=m, other=0.0).to(tl.float32)
        e = tl.exp(tl.minimum(v, 20.0))
        sp = tl.where(v > 20.0, v, _log1p(e))
        th = _tanh(v)
        out = tl.where(kind == 0, sp, tl.where(kind == 2, th, v))
        tl.store(out_ptr + r * C + c, out, mask=m)


@triton.jit
def _density_pack_bwd_kernel(raw_ptr, tab_ptr, g_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = c < C
    for r in range(_ROWS):
        idx, kind = _row(tab_ptr, r, c, C)
        v = tl.load(raw_ptr + idx, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r * C + c, mask=m, other=0.0)
        z = tl.exp(tl.minimum(v, 20.0))
        sig = tl.where(v > 20.0, 1.0, z / (z + 1.0))
        th = _tanh(v)
        f = tl.where(kind == 0, sig, tl.where(kind == 2, 1.0 - th * th, 1.0))
        tl.store(out_ptr + idx, g * f, mask=m)


@triton.jit
def _row(tab_ptr, r, c, C):
    """Packed row r's source indices in raw for channels c, and its kind."""
    s = tl.load(tab_ptr + 4 * r).to(tl.int64)
    n = tl.load(tab_ptr + 4 * r + 1).to(tl.int64)
    j = tl.load(tab_ptr + 4 * r + 2).to(tl.int64)
    return C * s + c * n + j, tl.load(tab_ptr + 4 * r + 3)


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0, accurate where 1 + e rounds (e < 1e-4: e - e^2/2 + e^3/3)."""
    return tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e * 0.33333333)), tl.log(1.0 + e))


@triton.jit
def _tanh(q):
    """tanh(q) = 1 - 2 / (1 + exp(2q)) (saturating to +-1), an odd Taylor polynomial below
    |q| = 1/4 where the subtraction would cancel."""
    t = 1.0 - 2.0 / (1.0 + tl.exp(tl.minimum(2.0 * q, 80.0)))
    q2 = q * q
    small = q + q * q2 * (-0.33333333333 + q2 * (0.13333333333 + q2 * (-0.053968253968 + q2 * 0.021869488536)))
    return tl.where(tl.abs(q) < 0.25, small, t)


_BLOCK_C = 128
_TABLES: dict = {}


def _table(widths: tuple, device: torch.device) -> torch.Tensor:
    key = (widths, str(device))
    t = _TABLES.get(key)
    if t is None:
        rows, s = [], 0
        for i, n in enumerate(widths):
            rows += [(s, n, j, i % 3) for j in range(n)]
            s += n
        if len(rows) != NUM_PACKED:
            raise ValueError(f"params must have {NUM_PACKED} values per channel, got {len(rows)}")
        t = _TABLES[key] = torch.tensor(rows, dtype=torch.int32, device=device)
    return t


def _raw(params: list) -> tuple:
    """(flat float32 concatenation of the params, their widths)."""
    C = params[0].shape[0]
    widths = tuple(p.numel() // C for p in params)
    return torch.cat([p.reshape(-1).float() for p in params]), widths


def density_pack(params: list) -> torch.Tensor:
    """The 14 CompressAI tensors (filters (3, 3, 3, 3)) -> packed [58, C] float32."""
    C = params[0].shape[0]
    out = torch.empty((NUM_PACKED, C), dtype=torch.float32, device=params[0].device)
    if C == 0:
        return out
    raw, widths = _raw(params)
    _density_pack_fwd_kernel[(triton.cdiv(C, _BLOCK_C),)](raw, _table(widths, raw.device), out, C,
                                                          BLOCK_C=_BLOCK_C)
    return out


def density_unpack_grad(grad_packed: torch.Tensor, params: list) -> list:
    """Packed gradient [58 or 59, C] (float32, contiguous) -> the params' gradients, each in
    its param's shape and dtype (contiguous views of one buffer when float32)."""
    C = params[0].shape[0]
    raw, widths = _raw(params)
    g = torch.empty_like(raw)
    if C > 0:
        _density_pack_bwd_kernel[(triton.cdiv(C, _BLOCK_C),)](
            raw, _table(widths, raw.device), grad_packed.float().contiguous(), g, C, BLOCK_C=_BLOCK_C)
    out, off = [], 0
    for p, n in zip(params, widths):
        gi = g[off:off + C * n].view(p.shape)
        off += C * n
        out.append(gi if gi.dtype == p.dtype and gi.stride() == p.stride()
                   else torch.empty_like(p).copy_(gi))
    return out
