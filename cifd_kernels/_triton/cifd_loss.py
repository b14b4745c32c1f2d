# SPDX-License-Identifier: Apache-2.0
"""Fused stage-2 CIFD loss (docs/METHOD.md section 4) in Triton, Liger-Kernel style.

One program per student row r reads the student's logits row ``z`` [K], the M target
rows ``t_m`` [K] and, with embeddings, ``u`` [D] and ``x_m`` [D] once (two
passes over K: max/sum, then values and gradients) and writes the per-sample
terms AND the gradients of the batch-mean loss with respect to ``z`` and ``u``.
Backward then only scales those gradients by ``grad_output``: nothing else is
saved and nothing is recomputed. Targets (teacher and RDMs) are frozen: they get
no gradient.

Dropped targets (keep flag 0) are never read: their loads are masked, so their
values (even NaN/inf) reach neither the loss nor a gradient, as in the reference.
fp32 math; inputs fp32/fp16/bf16; gradients in the input's dtype.

Labels must be classes in [0, K) or ``ignore_index`` (F.cross_entropy's rule). On CUDA
tensors the kernel checks that with ``tl.device_assert``, no host sync: a bad label
stops the kernel with a device-side assert, reported (as torch's own CUDA losses do)
at the stream's next synchronisation, after which the CUDA context is unusable. The
launch passes ``debug=True`` (Triton compiles device asserts only in debug mode) and,
where Triton has it, ``sanitize_overflow=False`` (so that debug adds nothing else).
The interpreter runs no device asserts: for CPU tensors the ops layer checks the labels on
the host first (the reference's IndexError). The math never indexes with a label (it
compares it to the class index), so nothing is read out of bounds either way.

K = 0 (head-less RDM banks, the logit part off: every label ignore_index, lam_ce =
lam_kl = 0): the sweeps over K are empty, nothing of the logits is read or written,
ce and kl are 0 and the embedding part is unchanged.

Groups (the stage-1 losses of an RDM bank in one launch): student logits [G, B, K]
and embeddings [G, B, D] against shared targets [M, B, K] / [M, B, D] and labels
[B]; row r = g B + b reads target row b; outputs are indexed by r; group g's
embedding gradient is scaled by ``group_w[g]``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from .entropy_bottleneck import _to_out

DIST_CODES = {"mse": 0, "smooth_l1": 1}


# Per sample b, with p_S = softmax(z / tau), p_m = softmax(t_m / tau), q = softmax(z),
# w_m = lam_m k_m (k_m the keep flag), n = #non-ignored labels:
#   ce_b   = lse(z) - z_y  (0 if y == ignore_index)          d/dz = (q - onehot(y)) lam_ce / n
#   kl_mb  = tau^2 sum_j p_mj (log p_mj - log p_Sj)          d/dz = lam_kl tau / B * sum_m w_m (p_S - p_m)
#   emb_mb = sum_d e(u_d - x_md), e = d^2 | smooth-L1(d)     d/du = w_emb / B * sum_m w_m e'(u - x_m)
# e'(d) = 2d (mse) or clamp(d, -1, 1) (smooth-L1, beta = 1). The batch-mean loss is
# lam_ce sum_b ce_b / n + lam_kl sum_m lam_m mean_b kl_mb + w_emb sum_m lam_m mean_b emb_mb.
@triton.jit
def _cifd_loss_fwd_kernel(
        z_ptr, t_ptr, y_ptr, u_ptr, x_ptr, lam_ptr, keep_ptr, nvalid_ptr, gw_ptr,
        gz_ptr, gu_ptr, ce_ptr, kl_ptr, emb_ptr,
        B, R, K, D, M, inv_tau, tau, lam_ce, c_kl, c_emb, ignore_index,
        MP: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DIST: tl.constexpr,
        HAS_EMB: tl.constexpr, HAS_GW: tl.constexpr, BF16_Z: tl.constexpr, BF16_U: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # student row g B + b
    b = r % B                          # its target / label row
    mi = tl.arange(0, MP)
    mvalid = mi < M
    keep = (tl.load(keep_ptr + mi, mask=mvalid, other=0) != 0) & mvalid
    lam = tl.load(lam_ptr + mi, mask=mvalid, other=0.0).to(tl.float32)
    w = tl.where(keep, lam, 0.0)
    w_sum = tl.sum(w, axis=0)
    label = tl.load(y_ptr + b)
    row_ok = label != ignore_index
    tl.device_assert((~row_ok) | ((label >= 0) & (label < K)),
                     "cifd_loss: labels must be in [0, K) or ignore_index")
    c_ce = tl.where(row_ok, lam_ce / tl.load(nvalid_ptr), 0.0)

    z_row = z_ptr + r * K
    t_rows = t_ptr + mi.to(tl.int64)[:, None] * (B * K) + b * K

    # pass 1: online max / sum of exp for the student at tau and at 1, and each target at tau
    m_s = float("-inf")
    s_s = 0.0
    m_1 = float("-inf")
    s_1 = 0.0
    z_y = 0.0
    m_t = tl.full([MP], float("-inf"), tl.float32)
    s_t = tl.zeros([MP], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        z = tl.load(z_row + kk, mask=km, other=0.0).to(tl.float32)
        zs = tl.where(km, z * inv_tau, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(zs, axis=0))
        s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs - m_new), axis=0)
        m_s = m_new
        z1 = tl.where(km, z, float("-inf"))
        m_new = tl.maximum(m_1, tl.max(z1, axis=0))
        s_1 = s_1 * tl.exp(m_1 - m_new) + tl.sum(tl.exp(z1 - m_new), axis=0)
        m_1 = m_new
        z_y += tl.sum(tl.where(kk == label, z, 0.0), axis=0)
        tm = keep[:, None] & km[None, :]
        t = tl.load(t_rows + kk[None, :], mask=tm, other=0.0).to(tl.float32)
        ts = tl.where(km[None, :], t * inv_tau, float("-inf"))
        mt_new = tl.maximum(m_t, tl.max(ts, axis=1))
        s_t = s_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(ts - mt_new[:, None]), axis=1)
        m_t = mt_new
    # K = 0 (a head-less RDM bank): no class, s = 0, and the empty log-sum-exp is m = -inf
    # without a log(0). For K >= 1, s >= 1 (the max term is exp(0)) or NaN: unchanged.
    lse_s = m_s + tl.log(tl.where(s_s == 0.0, 1.0, s_s))
    lse_1 = m_1 + tl.log(tl.where(s_1 == 0.0, 1.0, s_1))
    lse_t = m_t + tl.log(tl.where(s_t == 0.0, 1.0, s_t))
    tl.store(ce_ptr + r, tl.where(row_ok, lse_1 - z_y, 0.0))

    # pass 2: KL values and the logits gradient
    kl = tl.zeros([MP], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        z = tl.load(z_row + kk, mask=km, other=0.0).to(tl.float32)
        tm = keep[:, None] & km[None, :]
        t = tl.load(t_rows + kk[None, :], mask=tm, other=0.0).to(tl.float32)
        lp_s = z * inv_tau - lse_s
        p_s = tl.exp(lp_s)
        lp_t = t * inv_tau - lse_t[:, None]
        p_t = tl.exp(lp_t)
        kl += tl.sum(tl.where(tm, p_t * (lp_t - lp_s[None, :]), 0.0), axis=1)
        wp_t = tl.sum(tl.where(tm, w[:, None] * p_t, 0.0), axis=0)
        q = tl.exp(z - lse_1)
        g = c_ce * (q - tl.where(kk == label, 1.0, 0.0)) + c_kl * (w_sum * p_s - wp_t)
        tl.store(gz_ptr + r * K + kk, _to_out(g, gz_ptr, BF16_Z), mask=km)
    tl.store(kl_ptr + mi * R + r, tl.where(keep, (tau * tau) * kl, 0.0), mask=mvalid)

    if HAS_EMB:
        if HAS_GW:
            c_emb = c_emb * tl.load(gw_ptr + r // B)
        u_row = u_ptr + r * D
        x_rows = x_ptr + mi.to(tl.int64)[:, None] * (B * D) + b * D
        acc = tl.zeros([MP], tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dm = dd < D
            u = tl.load(u_row + dd, mask=dm, other=0.0).to(tl.float32)
            xm = keep[:, None] & dm[None, :]
            x = tl.load(x_rows + dd[None, :], mask=xm, other=0.0).to(tl.float32)
            diff = u[None, :] - x
            if DIST == 0:
                e = diff * diff
                de = 2.0 * diff
            else:
                ad = tl.abs(diff)
                e = tl.where(ad < 1.0, 0.5 * diff * diff, ad - 0.5)
                de = tl.minimum(tl.maximum(diff, -1.0), 1.0)
            acc += tl.sum(tl.where(xm, e, 0.0), axis=1)
            gu = c_emb * tl.sum(tl.where(xm, w[:, None] * de, 0.0), axis=0)
            tl.store(gu_ptr + r * D + dd, _to_out(gu, gu_ptr, BF16_U), mask=dm)
        tl.store(emb_ptr + mi * R + r, tl.where(keep, acc, 0.0), mask=mvalid)


# ----------------------------------------------------------------------------- host side
def _interpret() -> bool:
    return _backend.triton_interpret()


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


@functools.lru_cache(maxsize=None)
def _assert_launch_options() -> tuple:
    """The launch options that compile the kernel's ``tl.device_assert``: ``debug=True``
    (Triton drops device asserts otherwise) and, where this Triton has the switch,
    ``sanitize_overflow=False`` (debug mode's other effect: integer overflow checks on
    every int32 op). As (name, value) pairs; none under the interpreter, which runs no
    device asserts."""
    if _interpret():
        return ()
    opts = (("debug", True),)
    try:
        from triton.compiler.compiler import make_backend
        target = triton.runtime.driver.active.get_current_target()
        if hasattr(make_backend(target).parse_options({}), "sanitize_overflow"):
            opts += (("sanitize_overflow", False),)
    except Exception:  # an older Triton: debug alone (its overflow checks included)
        pass
    return opts


def cifd_loss_fwd(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                  student_emb, target_embs, lam: torch.Tensor, keep: torch.Tensor, nvalid: torch.Tensor,
                  tau: float, lam_ce: float, lam_kl: float, w_emb: float, dist: str, ignore_index: int,
                  group_w=None):
    """Per-sample terms and the gradients of the batch-mean loss, in one launch.

    Args:
        student_logits: [B, K], or [G, B, K] (groups, module docstring), K >= 0; target_logits:
            [M, B, K] (teacher first); labels: [B] integer, each in [0, K) or ignore_index
            (module docstring); student_emb: [B, D] ([G, B, D]) or None; target_embs:
            [M, B, D] or None. Float32/16/bf16, made contiguous here.
        lam: [M] float32 target weights; keep: [M] bool keep flags; nvalid: 0-dim float32,
            the number of non-ignored labels clamped to >= 1 (a tensor: no host sync).
        tau: temperature (KL scaled by tau^2); lam_ce, lam_kl, w_emb: term weights;
        dist: "mse" | "smooth_l1"; ignore_index: label left out of CE.
        group_w: None, or [G] float32 per-group weights of the embedding term (on top of
            w_emb; groups only).

    Returns:
        (ce [*] float32 nats (0 on ignored rows), kl [M, *] float32 (tau^2 KL, 0 for
        dropped targets), emb [M, *] float32 (0 for dropped targets; zeros without
        embeddings), grad_logits like student_logits, grad_emb like student_emb or an
        empty tensor), * = [B] or [G, B], the gradients being those of (per group)
        ``lam_ce * sum(ce) / nvalid + lam_kl * sum_m lam_m mean_b kl + w_emb * group_w[g] *
        sum_m lam_m mean_b emb``.
    """
    rows_shape = tuple(student_logits.shape[:-1])
    B, K = student_logits.shape[-2:]
    R = math.prod(rows_shape)  # not student_logits[..., 0]: K may be 0
    M = target_logits.shape[0]
    dev = student_logits.device
    z = student_logits.contiguous()
    t = target_logits.contiguous()
    has_emb = student_emb is not None
    D = student_emb.shape[-1] if has_emb else 1
    u = student_emb.contiguous() if has_emb else z
    x = target_embs.contiguous() if has_emb else z
    grad_z = torch.empty_like(z)
    grad_u = torch.empty_like(u) if has_emb else z.new_empty((0,))
    ce = torch.empty(rows_shape, dtype=torch.float32, device=dev)
    kl = torch.empty((M,) + rows_shape, dtype=torch.float32, device=dev)
    emb = (torch.empty if has_emb else torch.zeros)((M,) + rows_shape, dtype=torch.float32, device=dev)
    if R == 0:
        return ce, kl, emb, grad_z, grad_u
    has_gw = group_w is not None and group_w.numel() > 0
    MP = _pow2(M)
    interp = _interpret()
    # The interpreter runs one numpy op per Triton op: big blocks. On a GPU the target tile
    # [MP, BK] stays near 4k floats (32 registers a thread at 4 warps).
    cap = 16384 if interp else max(128, 4096 // MP)
    BK = min(_pow2(K), cap)
    BD = min(_pow2(D), cap)
    _cifd_loss_fwd_kernel[(R,)](
        z, t, labels.contiguous(), u, x, lam.float().contiguous(), keep.to(torch.uint8).contiguous(),
        nvalid, group_w.float().contiguous() if has_gw else lam, grad_z, grad_u, ce, kl, emb,
        B, R, K, D, M, 1.0 / tau, float(tau), float(lam_ce), float(lam_kl) * float(tau) / B,
        float(w_emb) / B, int(ignore_index),
        MP=MP, BK=BK, BD=BD, DIST=DIST_CODES[dist], HAS_EMB=has_emb, HAS_GW=has_gw,
        BF16_Z=interp and z.dtype == torch.bfloat16, BF16_U=interp and u.dtype == torch.bfloat16,
        num_warps=4 if interp else 8, **dict(_assert_launch_options()))
    return ce, kl, emb, grad_z, grad_u
