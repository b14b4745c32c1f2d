# SPDX-License-Identifier: Apache-2.0
"""Fused factorized entropy bottleneck (rate term), forward and backward, in Triton.

docs/METHOD.md sections 1 and 3. One pass over ``y`` [N, C, S] (S = prod(spatial),
1 for [B, C]) gives ``y_hat``, the per-sample rate in nats and optionally the
likelihoods; the backward pass re-draws noise and keep flags from
``(seed, offset)`` and recomputes the density MLP in registers, so nothing of
size [N, C] but ``y`` is saved.

Fast path: ``filters=(3, 3, 3, 3)`` (widths 1-3-3-3-3-1); ``ops.density_pack.supports`` says
whether a parameter set takes it, other filters fall back to the reference.

Density parameters travel packed per channel as one [58, C] float32 tensor
(``ops.density_pack.pack_density``): ``softplus(H_k)``, ``b_k`` and ``tanh(a_k)``, computed
by ``cifd_C::density_pack`` in one autograd node whose backward chains the packed
gradient back to ``H_k`` and ``a_k``.

Bit-exactness: ``y_hat`` equals the reference bit for bit. Triton contracts
``a*b + c`` into an FMA by default, which would round ``float(i)*scale - 1/2``
and ``y + s*u`` differently from the reference's separate float32 ops. The two
multiplies go through PTX ``mul.rn.f32`` in inline asm on the GPU (an opaque
op the compiler never contracts), and a plain multiply under
``TRITON_INTERPRET=1`` (numpy never contracts), so the density MLP keeps its
FMAs. Likelihoods, rates and gradients match the reference to float32 accuracy
(exp2 / reciprocal / log2 are the GPU's .approx.ftz instructions).

Rates and parameter gradients: per-program partial sums that torch sums in a
fixed order (bit-reproducible). On an H100 they were faster than float atomics
into one buffer, the other design measured ([4096, 512]: 146 vs 174 us;
[16, 192, 32, 32]: 184 vs 386 us), because ~30 programs share each channel.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.jit import JITFunction as _JITFunction

from .. import backend as _backend
from .._layout import MEDIAN_ROW as _MEDIAN_ROW, MODES as _MODES, NUM_GRAD, NUM_PACKED


def wrap_triton(kernel):
    """``torch.library.wrap_triton`` (launches visible to torch.compile inside a triton_op),
    passing Triton's interpreter kernels (TRITON_INTERPRET=1) through unchanged, as torch
    2.14 does: torch 2.11 raised on them, failing every Triton CPU test (142)."""
    return _torch_wrap_triton(kernel) if isinstance(kernel, _JITFunction) else kernel


# Triton compiles a variant per integer argument equal to 1 or divisible by 16; for the
# Philox seed and counter offset those hints buy nothing, and every new pair of values would
# compile the kernels again (a training run's advancing offset; the tests' many seeds).
_NO_SPEC = ("seed", "offset")

_MEDIAN_ROW_C = tl.constexpr(_MEDIAN_ROW)  # for the kernels
_NUM_GRAD_C = tl.constexpr(NUM_GRAD)

# Packed rows: layer 0: W[j] 0-2, b[j] 3-5, tanh(a)[j] 6-8; hidden layer k = 1..3 at
# base 9 + 15 (k - 1): W[j, i] base + 3j + i, b[j] base + 9 + j, tanh(a)[j] base + 12 + j;
# layer 4: W[0, i] 54-56, b 57.


# ----------------------------------------------------------------------------- elementwise math
@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """a * b rounded once, never contracted into a following add."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _div_rn(a, b, INTERPRET: tl.constexpr):
    """a / b rounded once (IEEE, as torch's division; Triton's own fp32 ``/`` is approximate)."""
    if INTERPRET:
        return a / b
    else:
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _uniform_rn(w, INTERPRET: tl.constexpr):
    """uint32 Philox word -> float32 uniform in [0, 1), as tl.rand / the reference."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    xf = x.to(tl.float32)
    return _mul_rn(xf, tl.full(xf.shape, 4.6566127342e-10, tl.float32), INTERPRET)


@triton.jit
def _round_half_even(t):
    """torch.round in float32 (ties to even, sign kept, so -0.3 -> -0.0)."""
    a = tl.abs(t)
    r = (a + 8388608.0) - 8388608.0  # exact for a < 2**23, where the ulp of a + 2**23 is 1
    sign = t.to(tl.int32, bitcast=True) & -2147483648
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(a < 8388608.0, r, t)  # |t| >= 2**23 (and inf, NaN) is already integral


@triton.jit
def _to_out(v, ptr, BF16_RNE: tl.constexpr):
    """Cast float32 v to ptr's element type, rounding to nearest even. BF16_RNE does the
    bfloat16 rounding by hand (the interpreter's own fp32 -> bf16 cast truncates)."""
    if BF16_RNE:
        b = v.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, (b >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


@triton.jit
def _yhat(y, idx, seed, offset, rho, s_noise, med, MODE: tl.constexpr, INTERPRET: tl.constexpr):
    """(y_hat, keep) in float32 from float32 y; the reference's order of operations."""
    if MODE == 0:
        w0, w1, _, _ = tl.randint4x(seed, offset + idx)
        u = _uniform_rn(w0, INTERPRET) - 0.5
        keep = _uniform_rn(w1, INTERPRET) >= rho
        su = _mul_rn(tl.full(u.shape, s_noise, tl.float32), u, INTERPRET)
        yh = tl.where(keep, y + su, 0.0)
    elif MODE == 1:
        yh = _round_half_even(y - med) + med
        keep = tl.full(y.shape, 1, tl.int1)
    else:
        yh = y
        keep = tl.full(y.shape, 1, tl.int1)
    return yh, keep


# ----------------------------------------------------------------------------- the density MLP
# Few, large helpers: the interpreter pays milliseconds per nested @triton.jit call, the GPU
# inlines them all.
# Lower and upper logits travel joined in a trailing axis of size 2 (tl.join / tl.split).
@triton.jit
def _load_first(pp, C, cix, cm):
    return (tl.load(pp + 0 * C + cix, mask=cm, other=0.0), tl.load(pp + 1 * C + cix, mask=cm, other=0.0),
            tl.load(pp + 2 * C + cix, mask=cm, other=0.0), tl.load(pp + 3 * C + cix, mask=cm, other=0.0),
            tl.load(pp + 4 * C + cix, mask=cm, other=0.0), tl.load(pp + 5 * C + cix, mask=cm, other=0.0),
            tl.load(pp + 6 * C + cix, mask=cm, other=0.0), tl.load(pp + 7 * C + cix, mask=cm, other=0.0),
            tl.load(pp + 8 * C + cix, mask=cm, other=0.0))


@triton.jit
def _load_hidden(pp, B: tl.constexpr, C, cix, cm):
    q = pp + B * C + cix
    return (tl.load(q + 0 * C, mask=cm, other=0.0), tl.load(q + 1 * C, mask=cm, other=0.0),
            tl.load(q + 2 * C, mask=cm, other=0.0), tl.load(q + 3 * C, mask=cm, other=0.0),
            tl.load(q + 4 * C, mask=cm, other=0.0), tl.load(q + 5 * C, mask=cm, other=0.0),
            tl.load(q + 6 * C, mask=cm, other=0.0), tl.load(q + 7 * C, mask=cm, other=0.0),
            tl.load(q + 8 * C, mask=cm, other=0.0), tl.load(q + 9 * C, mask=cm, other=0.0),
            tl.load(q + 10 * C, mask=cm, other=0.0), tl.load(q + 11 * C, mask=cm, other=0.0),
            tl.load(q + 12 * C, mask=cm, other=0.0), tl.load(q + 13 * C, mask=cm, other=0.0),
            tl.load(q + 14 * C, mask=cm, other=0.0))


@triton.jit
def _load_last(pp, C, cix, cm):
    q = pp + 54 * C + cix
    return (tl.load(q + 0 * C, mask=cm, other=0.0), tl.load(q + 1 * C, mask=cm, other=0.0),
            tl.load(q + 2 * C, mask=cm, other=0.0), tl.load(q + 3 * C, mask=cm, other=0.0))


# On the GPU, exp2 / reciprocal / log2 are single MUFU instructions (PTX .approx.ftz, 1-2 ulp)
# instead of the range-checked sequences tl.exp and "/" lower to; the interpreter uses numpy.
_ASM = tl.constexpr(not _backend.triton_interpret())


@triton.jit
def _ex2(x):
    if _ASM:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # finite in numpy (the GPU's ex2 returns inf); NaN stays NaN, as ex2.approx keeps it
        return tl.exp2(tl.minimum(x, 126.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _rcp(x):
    if _ASM:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _lg2(x):
    if _ASM:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _tanh(q):
    """tanh(q) = 2 / (1 + exp(-2q)) - 1 (exp overflowing to inf gives -1, as it should); an odd
    Taylor polynomial below |q| = 1/4, where 2r - 1 would cancel (error < 1e-8 relative)."""
    t = 2.0 * _rcp(1.0 + _ex2(q * -2.8853900817779268)) - 1.0
    q2 = q * q
    small = q + q * q2 * (-0.33333333333 + q2 * (0.13333333333 + q2 * (-0.053968253968 + q2 * 0.021869488536)))
    return tl.where(tl.abs(q) < 0.25, small, t)


@triton.jit
def _act(q0, q1, q2, a0, a1, a2):
    """h = q + tanh(a) tanh(q) for three units: (h0, h1, h2, t0, t1, t2)."""
    t0 = _tanh(q0)
    t1 = _tanh(q1)
    t2 = _tanh(q2)
    return q0 + a0 * t0, q1 + a1 * t1, q2 + a2 * t2, t0, t1, t2


@triton.jit
def _first_fwd(x, P):
    return _act(P[0] * x + P[3], P[1] * x + P[4], P[2] * x + P[5], P[6], P[7], P[8])


@triton.jit
def _hidden_fwd(h0, h1, h2, P):
    return _act(P[0] * h0 + P[1] * h1 + P[2] * h2 + P[9],
                P[3] * h0 + P[4] * h1 + P[5] * h2 + P[10],
                P[6] * h0 + P[7] * h1 + P[8] * h2 + P[11], P[12], P[13], P[14])


@triton.jit
def _last_fwd(h0, h1, h2, P):
    return P[0] * h0 + P[1] * h1 + P[2] * h2 + P[3]


@triton.jit
def _hidden_bwd(g0, g1, g2, t0, t1, t2, h0, h1, h2, P, A):
    """Back through h' = q + tanh(a) tanh(q), q = W h + b: returns dL/dh and the accumulators
    A (15 [BA, BB] sums: dW row-major, db, d tanh(a)) plus this tile's contribution."""
    q0 = g0 * (1.0 + P[12] * (1.0 - t0 * t0))
    q1 = g1 * (1.0 + P[13] * (1.0 - t1 * t1))
    q2 = g2 * (1.0 + P[14] * (1.0 - t2 * t2))
    d0 = P[0] * q0 + P[3] * q1 + P[6] * q2
    d1 = P[1] * q0 + P[4] * q1 + P[7] * q2
    d2 = P[2] * q0 + P[5] * q1 + P[8] * q2
    q0a, q0b = tl.split(q0)
    q1a, q1b = tl.split(q1)
    q2a, q2b = tl.split(q2)
    h0a, h0b = tl.split(h0)
    h1a, h1b = tl.split(h1)
    h2a, h2b = tl.split(h2)
    u0a, u0b = tl.split(g0 * t0)
    u1a, u1b = tl.split(g1 * t1)
    u2a, u2b = tl.split(g2 * t2)
    A = (A[0] + q0a * h0a + q0b * h0b, A[1] + q0a * h1a + q0b * h1b, A[2] + q0a * h2a + q0b * h2b,
         A[3] + q1a * h0a + q1b * h0b, A[4] + q1a * h1a + q1b * h1b, A[5] + q1a * h2a + q1b * h2b,
         A[6] + q2a * h0a + q2b * h0b, A[7] + q2a * h1a + q2b * h1b, A[8] + q2a * h2a + q2b * h2b,
         A[9] + q0a + q0b, A[10] + q1a + q1b, A[11] + q2a + q2b,
         A[12] + u0a + u0b, A[13] + u1a + u1b, A[14] + u2a + u2b)
    return d0, d1, d2, A


@triton.jit
def _first_bwd(g0, g1, g2, t0, t1, t2, x, P, A):
    """Back through the first layer (input width 1): (dL/dx summed over the pair, accumulators)."""
    q0 = g0 * (1.0 + P[6] * (1.0 - t0 * t0))
    q1 = g1 * (1.0 + P[7] * (1.0 - t1 * t1))
    q2 = g2 * (1.0 + P[8] * (1.0 - t2 * t2))
    xa, xb = tl.split(x)
    q0a, q0b = tl.split(q0)
    q1a, q1b = tl.split(q1)
    q2a, q2b = tl.split(q2)
    u0a, u0b = tl.split(g0 * t0)
    u1a, u1b = tl.split(g1 * t1)
    u2a, u2b = tl.split(g2 * t2)
    A = (A[0] + q0a * xa + q0b * xb, A[1] + q1a * xa + q1b * xb, A[2] + q2a * xa + q2b * xb,
         A[3] + q0a + q0b, A[4] + q1a + q1b, A[5] + q2a + q2b,
         A[6] + u0a + u0b, A[7] + u1a + u1b, A[8] + u2a + u2b)
    da, db = tl.split(P[0] * q0 + P[1] * q1 + P[2] * q2)
    return da + db, A


@triton.jit
def _last_bwd(gf, h0, h1, h2, P, A):
    """Back through f = W h + b: (dL/dh, accumulators (dW0, dW1, dW2, db))."""
    ga, gb = tl.split(gf)
    h0a, h0b = tl.split(h0)
    h1a, h1b = tl.split(h1)
    h2a, h2b = tl.split(h2)
    A = (A[0] + ga * h0a + gb * h0b, A[1] + ga * h1a + gb * h1b, A[2] + ga * h2a + gb * h2b, A[3] + ga + gb)
    return P[0] * gf, P[1] * gf, P[2] * gf, A


@triton.jit
def _bin_mass(f):
    """Stable sigmoid(U) - sigmoid(L) of joined logits f = (L, U): (p, joined (dp/dL, dp/dU))."""
    lo, up = tl.split(f)
    sgn = tl.where(lo + up > 0.0, -1.0, 1.0)
    z = f * tl.join(sgn, sgn)
    e = _ex2(tl.abs(z) * -1.4426950408889634)  # exp(-|z|) <= 1
    r = _rcp(1.0 + e)
    sig_lo, sig_up = tl.split(tl.where(z >= 0.0, r, e * r))
    d = sig_up - sig_lo
    sd = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0)) * sgn
    return tl.abs(d), e * r * r * tl.join(-sd, sd)


@triton.jit
def _flush(out, base: tl.constexpr, C, A, K: tl.constexpr, SPATIAL: tl.constexpr, cmv):
    """Reduce accumulators A[0..K) over the tile's rows into rows base.. of out."""
    for k in tl.static_range(K):
        if SPATIAL:
            v = tl.sum(A[k], axis=1)
        else:
            v = tl.sum(A[k], axis=0)
        tl.store(out + (base + k) * C, v, mask=cmv)


# ----------------------------------------------------------------------------- tiles
@triton.jit
def _tile(pid0, pid1, pid2, it, N, C, S, BA: tl.constexpr, BB: tl.constexpr, SPATIAL: tl.constexpr,
          ROWS_PER_PROG):
    """Element indices of one [BA, BB] tile: (idx, in-bounds mask, n, parameter column,
    channel mask).

    S == 1: rows n on axis 0, channels on axis 1 (contiguous); program axis 2 is the
    group g (``groups`` > 1: y is [G, N, C], group g's channel c is column g*C + c of
    the packed density). S > 1: channels on axis 0, spatial positions on axis 1
    (contiguous), one sample n per tile; axis 2 the position block. n is the row
    within the group. Channel tensors come back 3-D, broadcastable against joined
    (lower, upper) tiles.
    """
    if SPATIAL:
        n = pid0 * ROWS_PER_PROG + it
        c = pid1 * BA + tl.arange(0, BA)[:, None]
        sp = pid2 * BB + tl.arange(0, BB)[None, :]
        cmask = c < C
        m = cmask & (sp < S) & (n < N)
        idx = (n * C + c) * S + sp
        n_el = n
    else:
        n_el = pid0 * ROWS_PER_PROG + it * BA + tl.arange(0, BA)[:, None]
        c = pid1 * BB + tl.arange(0, BB)[None, :]
        cmask = c < C
        m = cmask & (n_el < N)
        idx = (pid2 * N + n_el) * C + c
        c = pid2 * C + c
    return idx, m, n_el, c[:, :, None], cmask[:, :, None]


# ----------------------------------------------------------------------------- forward
# y_hat = keep ? y + s*u : 0 (noise; u = U(word 0) - 1/2, keep = U(word 1) >= rho),
#         round(y - m_c) + m_c (dequantize), or y (none); the density's point x = y_hat, or
#         y_hat / s in noise mode with s != 1 (SCALED: the unit channel's rate of y / s);
# p = max(|sigmoid(g f_c(x + 1/2)) - sigmoid(g f_c(x - 1/2))|, bound), g = -sign(sum of logits);
# rate[n] = -sum_{c,s kept} ln p.  Gradient: _entropy_bottleneck_bwd_kernel.
@triton.jit(do_not_specialize=_NO_SPEC)
def _entropy_bottleneck_fwd_kernel(
        y_ptr, yhat_ptr, lik_ptr, rate_ptr, pp, med_ptr,
        N, C, S, CP, seed, offset, rho, s_noise, bound,
        MODE: tl.constexpr, SPATIAL: tl.constexpr, STORE_LIK: tl.constexpr, INTERPRET: tl.constexpr, BF16_RNE: tl.constexpr,
        SCALED: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
    pid0 = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    pid2 = tl.program_id(2).to(tl.int64)
    idx, m, n, cix, cm = _tile(pid0, pid1, pid2, 0, N, C, S, BA, BB, SPATIAL, 1 if SPATIAL else BA)
    y = tl.load(y_ptr + idx, mask=m, other=0.0).to(tl.float32)
    med = 0.0
    if MODE == 1:
        med = tl.load(med_ptr + cix, mask=cm, other=0.0)
        med = tl.reshape(med, med.shape[0], med.shape[1])
    yh, keep = _yhat(y, idx, seed, offset, rho, s_noise, med, MODE, INTERPRET)
    tl.store(yhat_ptr + idx, _to_out(yh, yhat_ptr, BF16_RNE), mask=m)

    if SCALED:
        yh = _div_rn(yh, tl.full(yh.shape, s_noise, tl.float32), INTERPRET)
    x = tl.join(yh - 0.5, yh + 0.5)
    h0, h1, h2, _, _, _ = _first_fwd(x, _load_first(pp, CP, cix, cm))
    h0, h1, h2, _, _, _ = _hidden_fwd(h0, h1, h2, _load_hidden(pp, 9, CP, cix, cm))
    h0, h1, h2, _, _, _ = _hidden_fwd(h0, h1, h2, _load_hidden(pp, 24, CP, cix, cm))
    h0, h1, h2, _, _, _ = _hidden_fwd(h0, h1, h2, _load_hidden(pp, 39, CP, cix, cm))
    f = _last_fwd(h0, h1, h2, _load_last(pp, CP, cix, cm))
    p, _ = _bin_mass(f)
    pb = tl.where(p < bound, bound, p)  # NaN stays NaN, as clamp_min
    if STORE_LIK:
        tl.store(lik_ptr + idx, pb, mask=m)
    nll = tl.where(m & keep, _lg2(pb) * -0.6931471805599453, 0.0)
    if SPATIAL:
        part = tl.sum(tl.sum(nll, axis=1), axis=0)
        tl.store(rate_ptr + (n * tl.num_programs(1) + pid1) * tl.num_programs(2) + pid2, part)
    else:
        part = tl.sum(nll, axis=1)
        rows = pid0 * BA + tl.arange(0, BA)
        out_rows = pid2 * N + rows  # group g's rows
        tl.store(rate_ptr + pid1 * (tl.num_programs(2) * N) + out_rows, part, mask=rows < N)


# ----------------------------------------------------------------------------- backward
# dL/dp_b = g_lik + keep * (-g_rate[n] / p_b); LowerBound: dL/dp = dL/dp_b where p >= bound or
# dL/dp_b < 0, else 0; dp/dU = sd g sigmoid'(g U), dp/dL = -sd g sigmoid'(g L) (sd = sign of the
# difference); then back through the MLP (h' = q + tanh(a) tanh(q), q = W h + b) for both logits.
# dy = keep * (g_yhat + dL/dy_hat) (noise), 0 (dequantize; the medians get the sum), or the sum (none);
# SCALED: dL/dy_hat = dL/dx / s.
# Parameter grads are reduced over the program's rows in registers, then written as
# per-program partials that the launcher sums in a fixed order.
@triton.jit(do_not_specialize=_NO_SPEC)
def _entropy_bottleneck_bwd_kernel(
        y_ptr, gyh_ptr, grate_ptr, glik_ptr, gy_ptr, gp_ptr, pp, med_ptr,
        N, C, S, CP, seed, offset, rho, s_noise, bound, ROWS_PER_PROG, ITERS,
        MODE: tl.constexpr, SPATIAL: tl.constexpr, HAS_GRATE: tl.constexpr, HAS_GLIK: tl.constexpr,
        INTERPRET: tl.constexpr, BF16_RNE: tl.constexpr,
        SCALED: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
    pid0 = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    pid2 = tl.program_id(2).to(tl.int64)
    _i0, _m0, _n0, cix, cm = _tile(pid0, pid1, pid2, 0, N, C, S, BA, BB, SPATIAL, ROWS_PER_PROG)
    P0 = _load_first(pp, CP, cix, cm)
    P1 = _load_hidden(pp, 9, CP, cix, cm)
    P2 = _load_hidden(pp, 24, CP, cix, cm)
    P3 = _load_hidden(pp, 39, CP, cix, cm)
    P4 = _load_last(pp, CP, cix, cm)
    med = 0.0
    if MODE == 1:
        med = tl.load(med_ptr + cix, mask=cm, other=0.0)
        med = tl.reshape(med, med.shape[0], med.shape[1])

    z = tl.zeros((BA, BB), tl.float32)
    A0 = (z, z, z, z, z, z, z, z, z)
    A1 = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    A2 = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    A3 = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    A4 = (z, z, z, z)
    Am = z
    for it in range(0, ITERS):
        idx, m, n, cix_it, cm_it = _tile(pid0, pid1, pid2, it, N, C, S, BA, BB, SPATIAL, ROWS_PER_PROG)
        y = tl.load(y_ptr + idx, mask=m, other=0.0).to(tl.float32)
        yh, keep = _yhat(y, idx, seed, offset, rho, s_noise, med, MODE, INTERPRET)
        if SCALED:
            yh = _div_rn(yh, tl.full(yh.shape, s_noise, tl.float32), INTERPRET)
        # forward again, keeping what the backward needs
        x = tl.join(yh - 0.5, yh + 0.5)
        a0, a1, a2, t00, t01, t02 = _first_fwd(x, P0)
        b0, b1, b2, t10, t11, t12 = _hidden_fwd(a0, a1, a2, P1)
        c0, c1, c2, t20, t21, t22 = _hidden_fwd(b0, b1, b2, P2)
        d0, d1, d2, t30, t31, t32 = _hidden_fwd(c0, c1, c2, P3)
        f = _last_fwd(d0, d1, d2, P4)
        p, dp = _bin_mass(f)
        pb = tl.where(p < bound, bound, p)
        g = tl.zeros_like(pb)
        if HAS_GLIK:
            g = tl.load(glik_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if HAS_GRATE:
            if SPATIAL:
                gr = tl.load(grate_ptr + n, mask=n < N, other=0.0).to(tl.float32)
            else:
                gr = tl.load(grate_ptr + pid2 * N + n, mask=n < N, other=0.0).to(tl.float32)
            g = g - tl.where(keep, gr * _rcp(pb), 0.0)
        g = tl.where(((p >= bound) | (g < 0.0)) & m, g, 0.0)  # LowerBound rule; zero outside
        # back through the MLP, both logits at once
        g0, g1, g2, A4 = _last_bwd(dp * tl.join(g, g), d0, d1, d2, P4, A4)
        g0, g1, g2, A3 = _hidden_bwd(g0, g1, g2, t30, t31, t32, c0, c1, c2, P3, A3)
        g0, g1, g2, A2 = _hidden_bwd(g0, g1, g2, t20, t21, t22, b0, b1, b2, P2, A2)
        g0, g1, g2, A1 = _hidden_bwd(g0, g1, g2, t10, t11, t12, a0, a1, a2, P1, A1)
        gyh, A0 = _first_bwd(g0, g1, g2, t00, t01, t02, x, P0, A0)
        if SCALED:
            gyh = _div_rn(gyh, tl.full(gyh.shape, s_noise, tl.float32), INTERPRET)
        gyh = gyh + tl.load(gyh_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            gy = tl.where(keep, gyh, 0.0)
        elif MODE == 1:
            gy = tl.zeros_like(gyh)
            Am = Am + tl.where(m, gyh, 0.0)
        else:
            gy = gyh
        tl.store(gy_ptr + idx, _to_out(gy, gy_ptr, BF16_RNE), mask=m)

    # reduce over the rows of the tile and write one value per (parameter, channel)
    if SPATIAL:
        cvec = pid1 * BA + tl.arange(0, BA)
        col = cvec
        prog = pid0 * tl.num_programs(2) + pid2
    else:
        cvec = pid1 * BB + tl.arange(0, BB)
        col = pid2 * C + cvec  # group g's parameter columns
        prog = pid0
    cmv = cvec < C
    out = gp_ptr + prog * (_NUM_GRAD_C * CP) + col
    _flush(out, 0, CP, A0, 9, SPATIAL, cmv)
    _flush(out, 9, CP, A1, 15, SPATIAL, cmv)
    _flush(out, 24, CP, A2, 15, SPATIAL, cmv)
    _flush(out, 39, CP, A3, 15, SPATIAL, cmv)
    _flush(out, 54, CP, A4, 4, SPATIAL, cmv)
    if MODE == 1:
        _flush(out, _MEDIAN_ROW_C, CP, (Am,), 1, SPATIAL, cmv)


# ----------------------------------------------------------------------------- host side
def _interpret() -> bool:
    return _backend.triton_interpret()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _tiles(C: int, S: int, tile: int, max_c: int) -> tuple[int, int]:
    """(BA, BB) of a tile of ``tile`` elements: S == 1: [rows, channels (<= max_c)];
    S > 1: [channels, positions]."""
    if S == 1:
        bb = min(_pow2(C), max_c)
        return max(1, tile // bb), bb
    bb = min(_pow2(S), tile)
    return max(1, min(_pow2(C), tile // bb)), bb


# (elements per tile, max channels per S == 1 tile, warps) for forward and backward. On the
# GPU a backward tile holds about one element per thread (the recomputed MLP keeps ~50 floats
# per element live, 200 registers); the interpreter runs one numpy op per Triton op, so it
# wants big tiles.
_GPU_FWD, _GPU_BWD = (512, 32, 4), (128, 32, 4)
_INTERP_FWD, _INTERP_BWD = (16384, 256, 4), (16384, 256, 4)


def _bwd_launch_options() -> dict:
    """Extra launch options of the backward kernel. The ``triton_bwd_maxnreg`` kernel
    option (``backend.KernelOptions``) caps its registers per thread (Triton's
    ``maxnreg``): an experiment for the GPU check, None by default (the compiler's
    choice). Static SASS for sm_90 (``tools/sass_stats.py``, Triton 3.8): uncapped 222
    registers (2 programs of 4 warps per SM), 803 instructions an element; 168: no
    spills, 820 (3 programs); 128: 42 spill stores and loads an element, 900 (4
    programs). Which is fastest is for the GPU to say."""
    cap = _backend.get_kernel_options().triton_bwd_maxnreg  # checked where it is set
    if cap is None or _interpret():  # the interpreter has no registers
        return {}
    return {"maxnreg": cap}


def _common(y, packed, medians, mode, seed, offset, groups=None):
    """Checks; (contiguous y, N, C, S, medians or a dummy) with N, C per group."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {tuple(_MODES)}, got {mode!r}")
    if groups is not None:
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if y.dim() != 3 or y.shape[0] != groups:
            raise ValueError(f"y must be [groups, N, C] = [{groups}, N, C], got shape {tuple(y.shape)}")
    if y.dim() < 2:
        raise ValueError(f"y must be [N, C, *spatial], got shape {tuple(y.shape)}")
    if y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"y must be float32/float16/bfloat16, got {y.dtype}")
    if groups is not None:
        N, C, S = y.shape[1], y.shape[2], 1
    else:
        N, C = y.shape[0], y.shape[1]
        S = y.numel() // max(1, N * C) if N * C > 0 else 1
    CP = (groups or 1) * C  # parameter columns
    if tuple(packed.shape) != (NUM_PACKED, CP) or packed.dtype != torch.float32 or not packed.is_contiguous():
        raise ValueError(f"packed must be a contiguous float32 [{NUM_PACKED}, {CP}] tensor (pack_density)")
    if mode == "dequantize":
        if medians is None or tuple(medians.shape) != (CP,):
            raise ValueError(f'mode="dequantize" needs medians [{CP}]')
        medians = medians.float().contiguous()
    else:
        medians = packed  # never read
    if not (0 <= seed < 2**63 and 0 <= offset and offset + y.numel() <= 2**63):
        raise ValueError("seed and offset + numel must lie in [0, 2**63)")
    return y.contiguous(), N, C, max(S, 1), medians


def entropy_bottleneck_fwd(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor] = None,
                           mode: str = "noise", seed: int = 0, offset: int = 0, rho: float = 0.0,
                           s: float = 1.0, bound: float = 1e-9, need_likelihood: bool = False,
                           groups: Optional[int] = None):
    """Fused forward.

    Args:
        y: [N, C, *spatial] or [N, C], float32/float16/bfloat16 (made contiguous);
            element i = (n*C + c)*S + s uses Philox counter ``offset + i``.
        packed: [58, C] float32 from ``ops.density_pack.pack_density``.
        medians: [C], read by ``mode="dequantize"`` only.
        mode: "noise" (y_hat = keep ? y + s*u : 0), "dequantize" (round(y - m) + m), "none".
        seed, offset: Python ints in [0, 2**63). rho: drop probability (noise mode only;
            keep = U(word 1) >= rho). s: noise scale (noise mode only; the density is read
            at y_hat / s, docs/METHOD.md section 3). bound: likelihood floor.
        need_likelihood: also return the per-element likelihoods.
        groups: G runs G independent [N, C] problems in one launch (the RDM bank's
            channel): y is [G, N, C], packed [58, G*C] (group g's channel c is column
            g*C + c), medians [G*C], counters ``offset`` + the flat index of y (so the
            bits are those of G calls on y[g] with columns g*C.. and offset + g*N*C).
            None (default): one problem, y [N, C, *spatial].

    Returns:
        (y_hat in y.dtype and shape, rate [N] ([G, N] with groups) float32 nats over kept
        elements, likelihood float32 in y's shape or None). Dropped elements'
        likelihood is p(0).
    """
    y3, N, C, S, med = _common(y, packed, medians, mode, seed, offset, groups)
    y_hat = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    lik = torch.empty(y.shape, dtype=torch.float32, device=y.device) if need_likelihood else None
    rate_shape = (groups, N) if groups is not None else (N,)
    groups = groups or 1
    if y.numel() == 0:
        return y_hat, torch.zeros(rate_shape, dtype=torch.float32, device=y.device), lik
    spatial = S > 1
    tile, max_c, warps = _INTERP_FWD if _interpret() else _GPU_FWD
    BA, BB = _tiles(C, S, tile, max_c)
    grid = (N, triton.cdiv(C, BA), triton.cdiv(S, BB)) if spatial else \
        (triton.cdiv(N, BA), triton.cdiv(C, BB), groups)
    rate_buf = torch.empty((grid[1], groups * N) if not spatial else (N, grid[1] * grid[2]),
                           dtype=torch.float32, device=y.device)
    wrap_triton(_entropy_bottleneck_fwd_kernel)[grid](
        y3, y_hat, lik if lik is not None else y_hat, rate_buf, packed, med,
        N, C, S, groups * C, seed, offset, float(rho), float(s), float(bound),
        MODE=_MODES[mode], SPATIAL=spatial, STORE_LIK=need_likelihood,
        INTERPRET=_interpret(), BF16_RNE=_interpret() and y.dtype == torch.bfloat16,
        SCALED=mode == "noise" and float(s) != 1.0, BA=BA, BB=BB, num_warps=warps)
    rate = rate_buf.sum(0) if not spatial else rate_buf.sum(1)  # fixed-order sum of the partials
    return y_hat, rate.view(rate_shape), lik


def entropy_bottleneck_bwd(y: torch.Tensor, packed: torch.Tensor, medians: Optional[torch.Tensor],
                           grad_y_hat: Optional[torch.Tensor], grad_rate: Optional[torch.Tensor],
                           grad_likelihood: Optional[torch.Tensor] = None, mode: str = "noise",
                           seed: int = 0, offset: int = 0, rho: float = 0.0, s: float = 1.0,
                           bound: float = 1e-9, row_programs: Optional[int] = None,
                           groups: Optional[int] = None):
    """Fused backward of :func:`entropy_bottleneck_fwd` (same arguments), recomputing noise,
    masks and the density MLP.

    Args:
        grad_y_hat: y's shape, any float dtype, or None (zero). grad_rate: [N] or None.
        grad_likelihood: y's shape or None.
        row_programs: how many programs share each channel block (default: enough to fill
            the GPU, 1 under the interpreter); results agree to rounding whatever it is.
        groups: as :func:`entropy_bottleneck_fwd` (grad_rate [G, N]); each group gets
            the row programs one call on its [N, C] block would, so the bits are those
            of G calls.

    Returns:
        (grad_y in y.dtype and shape, grad_packed [58, C] float32 (chain it with
        ``ops.density_pack.unpack_density_grad``), grad_medians [C] float32 (dequantize mode) or None);
        C is G*C with groups.
    """
    y3, N, C, S, med = _common(y, packed, medians, mode, seed, offset, groups)
    groups = groups or 1
    dev = y.device
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=dev)
    if grad_rate is not None and grad_rate.numel() != groups * N:
        raise ValueError(f"grad_rate must have {groups * N} elements, got {tuple(grad_rate.shape)}")
    if y.numel() == 0:
        gp = torch.zeros(NUM_GRAD, groups * C, dtype=torch.float32, device=dev)
        return grad_y, gp[:NUM_PACKED], (gp[_MEDIAN_ROW] if mode == "dequantize" else None)
    if grad_y_hat is None:
        gyh = torch.zeros(y.shape, dtype=torch.float32, device=dev)
    else:
        gyh = grad_y_hat.contiguous()
    grate = grad_rate.contiguous() if grad_rate is not None else gyh
    glik = grad_likelihood.contiguous() if grad_likelihood is not None else gyh
    spatial = S > 1
    tile, max_c, warps = _INTERP_BWD if _interpret() else _GPU_BWD
    BA, BB = _tiles(C, S, tile, max_c)
    if dev.type == "cuda":
        target = 4 * _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    else:
        target = 1
    if spatial:
        ncb, nsb = triton.cdiv(C, BA), triton.cdiv(S, BB)
        nprog = max(1, min(N, triton.cdiv(target, ncb * nsb)))
        if row_programs is not None:
            nprog = max(1, min(N, row_programs))
        rpp = triton.cdiv(N, nprog)  # samples per program
        iters = rpp
        grid = (triton.cdiv(N, rpp), ncb, nsb)
        nparts = grid[0] * nsb
    else:
        ncb = triton.cdiv(C, BB)
        nrb = triton.cdiv(N, BA)
        nprog = max(1, min(nrb, triton.cdiv(target, ncb)))
        if row_programs is not None:
            nprog = max(1, min(nrb, row_programs))
        iters = triton.cdiv(nrb, nprog)
        rpp = iters * BA
        grid = (triton.cdiv(N, rpp), ncb, groups)
        nparts = grid[0]
    gbuf = torch.empty((nparts, NUM_GRAD, groups * C), dtype=torch.float32, device=dev)
    wrap_triton(_entropy_bottleneck_bwd_kernel)[grid](
        y3, gyh, grate, glik, grad_y, gbuf, packed, med,
        N, C, S, groups * C, seed, offset, float(rho), float(s), float(bound), rpp, iters,
        MODE=_MODES[mode], SPATIAL=spatial, HAS_GRATE=grad_rate is not None,
        HAS_GLIK=grad_likelihood is not None,
        INTERPRET=_interpret(), BF16_RNE=_interpret() and y.dtype == torch.bfloat16,
        SCALED=mode == "noise" and float(s) != 1.0, BA=BA, BB=BB, num_warps=warps,
        **_bwd_launch_options())
    gp = gbuf.sum(0)  # fixed-order sum of the partials
    return grad_y, gp[:NUM_PACKED], (gp[_MEDIAN_ROW] if mode == "dequantize" else None)
